//! Debian version ordering (deb-version(7)), so the newest kernel package is chosen the way apt
//! would choose it: `6.12.117-1` after `6.12.113-1~deb12u1`, `6.1.192-2` after `6.1.192-1`.

use std::cmp::Ordering;

/// Compares two Debian versions `[epoch:]upstream[-revision]`.
pub fn compare(a: &str, b: &str) -> Ordering {
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb).then_with(|| compare_part(ua, ub)).then_with(|| compare_part(ra, rb))
}

/// (epoch, upstream, revision); a missing revision compares like "0", as in dpkg.
fn split(v: &str) -> (u64, &str, &str) {
    let (epoch, rest) = match v.split_once(':') {
        Some((e, rest)) => (e.parse().unwrap_or(0), rest),
        None => (0, v),
    };
    match rest.rsplit_once('-') {
        Some((upstream, revision)) => (epoch, upstream, revision),
        None => (epoch, rest, ""),
    }
}

/// dpkg's `verrevcmp`: alternating runs of non-digits (compared by `weight`) and digits
/// (compared as numbers).
fn compare_part(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    while !a.is_empty() || !b.is_empty() {
        let (na, ra) = split_run(a, |c| !c.is_ascii_digit());
        let (nb, rb) = split_run(b, |c| !c.is_ascii_digit());
        let longest = na.len().max(nb.len());
        for i in 0..longest {
            let ord = weight(na.get(i).copied()).cmp(&weight(nb.get(i).copied()));
            if ord != Ordering::Equal {
                return ord;
            }
        }
        let (da, ra) = split_run(ra, |c| c.is_ascii_digit());
        let (db, rb) = split_run(rb, |c| c.is_ascii_digit());
        let ord = compare_digits(da, db);
        if ord != Ordering::Equal {
            return ord;
        }
        (a, b) = (ra, rb);
    }
    Ordering::Equal
}

fn split_run(s: &[u8], pred: impl Fn(&u8) -> bool) -> (&[u8], &[u8]) {
    s.split_at(s.iter().position(|c| !pred(c)).unwrap_or(s.len()))
}

/// `~` sorts before everything (even the end of the string), letters before other symbols.
fn weight(c: Option<u8>) -> i32 {
    match c {
        Some(b'~') => -1,
        None => 0,
        Some(c) if c.is_ascii_alphabetic() => i32::from(c),
        Some(c) => i32::from(c) + 256,
    }
}

/// Numeric comparison of two digit runs of any length (an empty run is zero).
fn compare_digits(a: &[u8], b: &[u8]) -> Ordering {
    let trim = |s: &[u8]| -> usize { s.iter().position(|&c| c != b'0').unwrap_or(s.len()) };
    let (a, b) = (&a[trim(a)..], &b[trim(b)..]);
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_like_dpkg() {
        let ascending = [
            "6.1.99-1",
            "6.1.170-3",
            "6.1.192-1",
            "6.1.192-2",
            "6.12.69-1~bpo12+1",
            "6.12.113-1~deb12u1",
            "6.12.113-1",
            "6.12.117-1",
            "1:0.1-1",
        ];
        for pair in ascending.windows(2) {
            assert_eq!(compare(pair[0], pair[1]), Ordering::Less, "{} < {}", pair[0], pair[1]);
            assert_eq!(compare(pair[1], pair[0]), Ordering::Greater, "{} > {}", pair[1], pair[0]);
        }
    }

    #[test]
    fn tilde_sorts_before_the_end_and_leading_zeros_do_not_count() {
        assert_eq!(compare("1.0~rc1-1", "1.0-1"), Ordering::Less);
        assert_eq!(compare("1.0a", "1.0+"), Ordering::Less);
        assert_eq!(compare("1.002-1", "1.2-1"), Ordering::Equal);
        assert_eq!(compare("1.0", "1.0-0"), Ordering::Equal);
    }
}
