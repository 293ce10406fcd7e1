//! Reading a container's `/etc/passwd`, the same way on the host (which looks the home
//! directory up in the rootfs before the guest runs) and in the guest.

/// The home directory of `uid` in the text of a passwd file, if it has an entry.
pub fn home_of(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 6 && f[2].parse() == Ok(uid)).then(|| f[5].to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_entry_of_the_uid_and_only_a_complete_one() {
        let text = "root:x:0:0:root:/root:/bin/sh\nbroken:x:7\nuser:x:1000:1000::/home/u:/bin/sh\n";
        assert_eq!(home_of(text, 0).as_deref(), Some("/root"));
        assert_eq!(home_of(text, 1000).as_deref(), Some("/home/u"));
        assert_eq!(home_of(text, 7), None);
        assert_eq!(home_of(text, 42), None);
    }
}
