/* The sandbox ("pause") process of the test cluster's pods: it holds the pod's namespaces, reaps
 * the zombies a shared PID namespace leaves it, and exits at once on SIGINT or SIGTERM. Built
 * statically by tests/src/cluster/images.rs, since nothing can be pulled here. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) {
  (void)sig;
  _exit(0);
}

static void reap(int sig) {
  (void)sig;
  while (waitpid(-1, 0, WNOHANG) > 0) {
  }
}

int main(void) {
  signal(SIGINT, stop);
  signal(SIGTERM, stop);
  signal(SIGCHLD, reap);
  for (;;) {
    pause();
  }
}
