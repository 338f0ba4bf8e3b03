//! Paths inside an action's input root, as REAPI gives them: the working
//! directory relative to the root, output paths relative to the working
//! directory. `.` and `..` segments are allowed as long as the path stays
//! beneath the root (BuildStream sends `output_paths: [".", "../../x"]`).
//! Resolution here is lexical; the executor then walks the result without
//! following any symlink, so a symlink can never make it mean anything else.

/// The components, beneath the input root, of `rel` taken relative to
/// `base` (itself relative to the root). Empty: the root itself. A trailing
/// slash is ignored. Errors say what is wrong with the path.
pub fn beneath(base: &str, rel: &str) -> Result<Vec<String>, String> {
    if base.starts_with('/') || rel.starts_with('/') {
        return Err("is absolute; it must be relative".into());
    }
    let mut parts: Vec<String> = Vec::new();
    for seg in base.split('/').chain(rel.trim_end_matches('/').split('/')) {
        match seg {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err("climbs out of the input root".into());
                }
            }
            s if s.contains('\0') => return Err("contains a NUL byte".into()),
            s => parts.push(s.to_string()),
        }
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_dots_that_stay_beneath_the_root() {
        assert_eq!(beneath("", "a/b").unwrap(), ["a", "b"]);
        assert_eq!(beneath("x/y", ".").unwrap(), ["x", "y"]);
        assert_eq!(beneath("a/b/c", "../../../install").unwrap(), ["install"]);
        assert_eq!(beneath("a", "./b//c/").unwrap(), ["a", "b", "c"]);
        assert!(beneath("", ".").unwrap().is_empty());
    }

    #[test]
    fn refuses_paths_that_leave_the_root() {
        assert!(beneath("", "..").is_err());
        assert!(beneath("a", "../../etc").is_err());
        assert!(beneath("", "/etc/shadow").is_err());
        assert!(beneath("/abs", "x").is_err());
        assert!(beneath("", "a\0b").is_err());
    }
}
