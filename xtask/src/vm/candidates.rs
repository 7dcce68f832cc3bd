//! Which Debian package is "kernel 6.1" or "kernel 6.12": the newest generic amd64 image of that
//! series in any configured suite, from `apt-cache madison` output.

use super::debversion;

/// One installable kernel image package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub package: String,
    pub version: String,
}

/// Whether `package` is a generic amd64 image of `series` ("6.1" matches
/// `linux-image-6.1.0-56-amd64`, "6.12" matches `linux-image-6.12.117+deb13-amd64`), and if so
/// whether it is the `-unsigned` variant. Cloud, RT and debug flavours are not what nodes run.
pub fn image_of_series(series: &str, package: &str) -> Option<bool> {
    let rest = package.strip_prefix("linux-image-")?;
    let (rest, unsigned) = match rest.strip_suffix("-unsigned") {
        Some(r) => (r, true),
        None => (rest, false),
    };
    let abi = rest.strip_suffix("-amd64")?;
    // "6.1" must not match "6.12...": the series is followed by a separator or nothing.
    let after = abi.strip_prefix(series)?;
    if !(after.is_empty() || after.starts_with(['.', '-', '+'])) {
        return None;
    }
    // Numbers, then maybe a "+deb13.1"-like tag: a flavour ("-cloud", "-rt") has a dash and
    // letters after the numbers.
    let (numbers, tag) = abi.split_once('+').unwrap_or((abi, ""));
    let plain = numbers.chars().all(|c| c.is_ascii_digit() || c == '.' || c == '-')
        && tag.chars().all(|c| c.is_ascii_alphanumeric() || c == '.');
    plain.then_some(unsigned)
}

/// The newest image of `series` in `madison` output (`package | version | source` lines);
/// at equal versions the `-unsigned` package wins (the same kernel without the signing wrapper).
pub fn newest(series: &str, madison: &str) -> Option<Candidate> {
    madison
        .lines()
        .filter_map(|line| {
            let mut fields = line.split('|').map(str::trim);
            let (package, version) = (fields.next()?, fields.next()?);
            let unsigned = image_of_series(series, package)?;
            Some((Candidate { package: package.into(), version: version.into() }, unsigned))
        })
        .max_by(|(a, a_unsigned), (b, b_unsigned)| {
            debversion::compare(&a.version, &b.version)
                .then(a_unsigned.cmp(b_unsigned))
                .then_with(|| a.package.cmp(&b.package).reverse())
        })
        .map(|(c, _)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MADISON: &str = "\
linux-image-6.1.0-50-amd64 |  6.1.176-1 | http://deb.debian.org/debian bookworm/main amd64 Packages
linux-image-6.1.0-56-amd64 |  6.1.192-2 | http://deb.debian.org/debian-security bookworm-security/main amd64 Packages
linux-image-6.1.0-56-amd64-unsigned |  6.1.192-2 | http://deb.debian.org/debian-security bookworm-security/main amd64 Packages
linux-image-6.1.0-56-cloud-amd64 |  6.1.192-2 | http://deb.debian.org/debian-security bookworm-security/main amd64 Packages
linux-image-6.12.69+deb12-amd64 | 6.12.69-1~bpo12+1 | http://deb.debian.org/debian bookworm-backports/main amd64 Packages
linux-image-6.12.113+deb12-amd64 | 6.12.113-1~deb12u1 | http://deb.debian.org/debian-security bookworm-security/main amd64 Packages
linux-image-6.12.117+deb13-amd64 | 6.12.117-1 | http://deb.debian.org/debian-security trixie-security/main amd64 Packages
linux-image-6.12.117+deb13-rt-amd64 | 6.12.117-1 | http://deb.debian.org/debian-security trixie-security/main amd64 Packages
linux-image-6.12.115+deb13.1-amd64-unsigned | 6.12.115-2 | http://deb.debian.org/debian-security trixie-security/main amd64 Packages
";

    fn candidate(package: &str, version: &str) -> Candidate {
        Candidate { package: package.into(), version: version.into() }
    }

    #[test]
    fn series_names_match_only_generic_amd64_images() {
        assert_eq!(image_of_series("6.1", "linux-image-6.1.0-56-amd64"), Some(false));
        assert_eq!(image_of_series("6.1", "linux-image-6.1.0-56-amd64-unsigned"), Some(true));
        assert_eq!(image_of_series("6.12", "linux-image-6.12.115+deb13.1-amd64"), Some(false));
        assert_eq!(image_of_series("6.1", "linux-image-6.12.117+deb13-amd64"), None);
        assert_eq!(image_of_series("6.1", "linux-image-6.1.0-56-cloud-amd64"), None);
        assert_eq!(image_of_series("6.12", "linux-image-6.12.117+deb13-rt-amd64"), None);
        assert_eq!(image_of_series("6.1", "linux-image-6.1.0-56-amd64-dbg"), None);
        assert_eq!(image_of_series("6.1", "linux-image-amd64"), None);
    }

    #[test]
    fn picks_the_newest_version_and_prefers_unsigned() {
        assert_eq!(
            newest("6.1", MADISON),
            Some(candidate("linux-image-6.1.0-56-amd64-unsigned", "6.1.192-2"))
        );
        // A newer signed image beats an older unsigned one, across suites.
        assert_eq!(
            newest("6.12", MADISON),
            Some(candidate("linux-image-6.12.117+deb13-amd64", "6.12.117-1"))
        );
        assert_eq!(newest("6.6", MADISON), None);
    }
}
