//! Resolves a `dockerUser` spec (`uid`, `uid:gid`, `name`, `name:group`)
//! against the image's /etc/passwd and /etc/group.

use std::fs;

fn lookup(file: &str, name: &str) -> Option<(u32, Option<u32>)> {
    let text = fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.first() != Some(&name) {
            return None;
        }
        let id = f.get(2)?.parse().ok()?;
        let primary = f.get(3).and_then(|g| g.parse().ok());
        Some((id, primary))
    })
}

/// Returns (uid, gid).
pub fn resolve(spec: &str) -> Result<(u32, u32), String> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u.trim(), Some(g.trim())),
        None => (spec.trim(), None),
    };
    let (uid, primary) = match user.parse::<u32>() {
        Ok(uid) => (uid, None),
        Err(_) => lookup("/etc/passwd", user)
            .ok_or_else(|| format!("user {user:?} is not in the image's /etc/passwd"))?,
    };
    let gid = match group {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                lookup("/etc/group", g)
                    .ok_or_else(|| format!("group {g:?} is not in the image's /etc/group"))?
                    .0
            }
        },
        None => primary.unwrap_or(uid),
    };
    Ok((uid, gid))
}
