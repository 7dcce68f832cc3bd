# A workload that tries to get packets out from its first instant, for the end-to-end suite
# (tests/tests/k8s_e2e.rs): for a few seconds it sends UDP datagrams to the outside (to port
# DGRAM_PORT) and, once it knows the node's MAC address (learned from the ARP reply that a probe
# to the cluster DNS causes for the default gateway), hand-built Ethernet frames carrying UDP to
# FRAME_PORT through an AF_PACKET socket. Nothing in the loop blocks: it sends from its first
# instant, also while DNS is down (as at a node's boot). It prints what it did; the test counts
# what arrived.
import fcntl
import socket
import struct
import sys
import time

DST, DGRAM_PORT, FRAME_PORT, SECONDS = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def own_ipv4():
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # SIOCGIFADDR
    return fcntl.ioctl(probe.fileno(), 0x8915, struct.pack("256s", b"eth0"))[20:24]


def default_gateway():
    with open("/proc/net/route") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1] == "00000000":
                return socket.inet_ntoa(struct.pack("<I", int(fields[2], 16)))
    return None


def nameserver():
    with open("/etc/resolv.conf") as conf:
        for line in conf:
            fields = line.split()
            if len(fields) >= 2 and fields[0] == "nameserver":
                return fields[1]
    return None


def neighbour_mac(address):
    # The default gateway's entry (on a bridge the table also holds other pods).
    with open("/proc/net/arp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[0] == address and fields[3] != "00:00:00:00:00:00":
                return bytes.fromhex(fields[3].replace(":", ""))
    return None


def frame(dst_mac, src_mac, src_ip):
    payload = b"frame"
    udp = struct.pack("!HHHH", 40000, FRAME_PORT, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, src_ip, socket.inet_aton(DST))
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return dst_mac + src_mac + b"\x08\x00" + header + udp


udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.setblocking(False)
# An empty datagram to the cluster DNS (allowed, and off-link: the kernel resolves the default
# gateway's address to send it) makes the node's MAC known without waiting for an answer.
probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
probe.setblocking(False)
dns = nameserver()
raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
raw.bind(("eth0", 0))
raw.setblocking(False)
with open("/sys/class/net/eth0/address") as f:
    src_mac = bytes.fromhex(f.read().strip().replace(":", ""))
src_ip = own_ipv4()
sent = refused = frames = 0
dst_mac = None


def report():
    print("datagrams sent %d refused %d, frames sent %d, node MAC known: %s"
          % (sent, refused, frames, dst_mac is not None), flush=True)


end = time.time() + SECONDS
next_report = time.time() + 5
while time.time() < end:
    try:
        udp.sendto(b"dgram", (DST, DGRAM_PORT))
        sent += 1
    except OSError:
        refused += 1
    if dst_mac is None:
        try:
            probe.sendto(b"", (dns, 53))
        except (OSError, TypeError):
            pass
        dst_mac = neighbour_mac(default_gateway())
    if dst_mac is not None:
        try:
            raw.send(frame(dst_mac, src_mac, src_ip))
            frames += 1
        except BlockingIOError:
            pass
    if time.time() >= next_report:
        report()
        next_report += 5
    time.sleep(0.005)
report()
