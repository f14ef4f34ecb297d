//! Who a command runs as: an image's `User` (`name`, `uid`, `name:group`, `uid:gid`, any mix)
//! resolved against the sandbox's own /etc/passwd and /etc/group, as container runtimes do. A
//! numeric user without an entry runs with group 0 and `/` as its home.

use super::error::OpError;
use std::path::PathBuf;

/// A resolved user: its ids and its home directory (HOME, and the default working directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// Who a command runs as and its home: root and the agent's home, or a resolved user and theirs
/// (`/` when it is not a directory).
pub struct RunAs {
    pub identity: Option<Identity>,
    pub home: PathBuf,
}

pub fn run_as(user: Option<&str>, agent_home: &std::path::Path) -> Result<RunAs, OpError> {
    let Some(spec) = user else { return Ok(RunAs { identity: None, home: agent_home.to_path_buf() }) };
    let identity = resolve(spec)?;
    let home = if identity.home.is_dir() { identity.home.clone() } else { PathBuf::from("/") };
    Ok(RunAs { identity: Some(identity), home })
}

/// Resolves `spec` with the guest's own account files.
pub fn resolve(spec: &str) -> Result<Identity, OpError> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    resolve_in(spec, &passwd, &group)
}

/// Resolves `spec` with the text of an /etc/passwd and an /etc/group.
pub fn resolve_in(spec: &str, passwd: &str, group: &str) -> Result<Identity, OpError> {
    let (user, group_part) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    if user.is_empty() || group_part.is_some_and(str::is_empty) {
        return Err(OpError::bad_request(format!("user {spec:?} is not `user`, `uid`, `user:group` or `uid:gid`")));
    }
    // passwd: name:password:uid:gid:gecos:home:shell
    let entry = passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.len() >= 7 && (fields[0] == user || (user.parse::<u32>().is_ok() && fields[2] == user)));
    let (uid, mut gid, home) = match (&entry, user.parse::<u32>()) {
        (Some(fields), _) => {
            let number = |i: usize| fields[i].parse::<u32>();
            match (number(2), number(3)) {
                (Ok(uid), Ok(gid)) => (uid, gid, PathBuf::from(fields[5])),
                _ => return Err(OpError::bad_request(format!("the passwd entry of user {user:?} is malformed"))),
            }
        }
        (None, Ok(uid)) => (uid, 0, PathBuf::from("/")),
        (None, Err(_)) => {
            return Err(OpError::bad_request(format!("user {user:?} is not in the sandbox's /etc/passwd")))
        }
    };
    if let Some(name) = group_part {
        gid = match name.parse::<u32>() {
            Ok(gid) => gid,
            // group: name:password:gid:members
            Err(_) => group
                .lines()
                .map(|line| line.split(':').collect::<Vec<_>>())
                .find(|fields| fields.len() >= 3 && fields[0] == name)
                .and_then(|fields| fields[2].parse::<u32>().ok())
                .ok_or_else(|| OpError::bad_request(format!("group {name:?} is not in the sandbox's /etc/group")))?,
        };
    }
    Ok(Identity { uid, gid, home })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str =
        "root:x:0:0:root:/root:/bin/bash\napp:x:1000:1000::/home/app:/bin/sh\nbroken:x:a:b::/x:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:app\napp:x:1000:\n";

    #[test]
    fn names_numbers_and_groups_resolve_as_container_runtimes_do() {
        let app = Identity { uid: 1000, gid: 1000, home: "/home/app".into() };
        assert_eq!(resolve_in("app", PASSWD, GROUP).unwrap(), app);
        assert_eq!(resolve_in("1000", PASSWD, GROUP).unwrap(), app, "a uid with an entry takes its group and home");
        assert_eq!(resolve_in("app:staff", PASSWD, GROUP).unwrap(), Identity { gid: 50, ..app.clone() });
        assert_eq!(resolve_in("app:7", PASSWD, GROUP).unwrap(), Identity { gid: 7, ..app });
        assert_eq!(resolve_in("4242", PASSWD, GROUP).unwrap(), Identity { uid: 4242, gid: 0, home: "/".into() });
        assert_eq!(resolve_in("4242:4242", "", "").unwrap(), Identity { uid: 4242, gid: 4242, home: "/".into() });
    }

    #[test]
    fn unknown_or_malformed_users_are_refused_with_the_reason() {
        for (spec, says) in [
            ("nobody-here", "not in the sandbox's /etc/passwd"),
            ("app:nogroup", "not in the sandbox's /etc/group"),
            ("broken", "malformed"),
            ("", "is not"),
            ("app:", "is not"),
        ] {
            let err = resolve_in(spec, PASSWD, GROUP).unwrap_err();
            assert!(err.to_string().contains(says), "{spec}: {err}");
        }
    }
}
