//! Who an exec runs as: an image's `User` (`name`, `uid`, `name:group`,
//! `uid:gid`) turned into ids with the root's own `/etc/passwd` and
//! `/etc/group`, by the rules Docker applies, so an image behaves here as
//! it does under `docker run`:
//!
//! * a name must be in `passwd`; a number need not be, and then runs with
//!   group 0 and `HOME=/`;
//! * a group, when given, replaces the primary group, and a named group
//!   must be in `group`;
//! * the supplementary groups are those that list the user by name, plus
//!   the primary group.

use std::fs;

/// Ids and home directory of the user an exec runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: String,
}

/// Resolves `spec` against the root's account files; a missing file counts
/// as an empty one, so numeric ids work in images without them.
pub fn lookup(spec: &str) -> Result<Credentials, String> {
    let read = |path: &str| fs::read_to_string(path).unwrap_or_default();
    resolve(spec, &read("/etc/passwd"), &read("/etc/group"))
}

struct Account<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn accounts(passwd: &str) -> impl Iterator<Item = Account<'_>> {
    passwd.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        match fields.as_slice() {
            [name, _, uid, gid, _, home, ..] => Some(Account {
                name,
                uid: uid.parse().ok()?,
                gid: gid.parse().ok()?,
                home,
            }),
            _ => None,
        }
    })
}

/// `(name, gid, members)` of each well-formed line of a group file.
fn groups(group: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> {
    group.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        match fields.as_slice() {
            [name, _, gid, members, ..] => Some((
                *name,
                gid.parse().ok()?,
                members.split(',').filter(|m| !m.is_empty()).collect(),
            )),
            _ => None,
        }
    })
}

fn resolve(spec: &str, passwd: &str, group: &str) -> Result<Credentials, String> {
    let (user, group_spec) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    let (uid, account) = match user.parse::<u32>() {
        Ok(uid) => (uid, accounts(passwd).find(|a| a.uid == uid)),
        Err(_) => {
            let account = accounts(passwd)
                .find(|a| a.name == user)
                .ok_or_else(|| format!("unable to find user {user}: no entry in /etc/passwd"))?;
            (account.uid, Some(account))
        }
    };
    let mut gid = account.as_ref().map_or(0, |a| a.gid);
    if let Some(group_spec) = group_spec {
        gid = match group_spec.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => groups(group)
                .find(|(name, _, _)| *name == group_spec)
                .map(|(_, gid, _)| gid)
                .ok_or_else(|| {
                    format!("unable to find group {group_spec}: no entry in /etc/group")
                })?,
        };
    }
    let mut supplementary = vec![gid];
    if let Some(account) = &account {
        for (_, id, members) in groups(group) {
            if members.contains(&account.name) && !supplementary.contains(&id) {
                supplementary.push(id);
            }
        }
    }
    let home = account
        .as_ref()
        .map(|a| a.home)
        .filter(|home| home.starts_with('/'))
        .unwrap_or("/");
    Ok(Credentials {
        uid,
        gid,
        groups: supplementary,
        home: home.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        app:x:1000:1000:App:/home/app:/bin/sh\n\
        broken line\n\
        nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
    const GROUP: &str = "root:x:0:\napp:x:1000:\nstaff:x:50:app,other\nwheel:x:10:other\n";

    fn creds(uid: u32, gid: u32, groups: &[u32], home: &str) -> Credentials {
        Credentials {
            uid,
            gid,
            groups: groups.to_vec(),
            home: home.into(),
        }
    }

    #[test]
    fn names_take_ids_home_and_groups_from_the_account_files() {
        assert_eq!(
            resolve("app", PASSWD, GROUP),
            Ok(creds(1000, 1000, &[1000, 50], "/home/app"))
        );
        assert_eq!(
            resolve("root", PASSWD, GROUP),
            Ok(creds(0, 0, &[0], "/root"))
        );
    }

    #[test]
    fn numbers_need_no_account() {
        assert_eq!(
            resolve("1000", PASSWD, GROUP),
            Ok(creds(1000, 1000, &[1000, 50], "/home/app"))
        );
        assert_eq!(
            resolve("4242", PASSWD, GROUP),
            Ok(creds(4242, 0, &[0], "/"))
        );
        assert_eq!(resolve("4242:7", "", ""), Ok(creds(4242, 7, &[7], "/")));
    }

    #[test]
    fn a_group_replaces_the_primary_one() {
        assert_eq!(
            resolve("app:staff", PASSWD, GROUP),
            Ok(creds(1000, 50, &[50], "/home/app"))
        );
        assert_eq!(
            resolve("app:10", PASSWD, GROUP),
            Ok(creds(1000, 10, &[10, 50], "/home/app"))
        );
    }

    #[test]
    fn unknown_names_are_errors() {
        assert!(resolve("ghost", PASSWD, GROUP)
            .expect_err("an unknown name")
            .contains("unable to find user ghost"));
        assert!(resolve("app:ghosts", PASSWD, GROUP)
            .expect_err("an unknown name")
            .contains("unable to find group ghosts"));
    }

    #[test]
    fn a_relative_home_becomes_the_root() {
        assert_eq!(
            resolve("x", "x:x:5:5::relative:/bin/sh\n", ""),
            Ok(creds(5, 5, &[5], "/"))
        );
    }
}
