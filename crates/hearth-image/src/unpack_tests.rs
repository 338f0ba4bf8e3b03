//! Unit tests of layer application, on tars built here byte by byte (so hostile names
//! that `tar::Builder` would refuse can be written).

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use tar::{EntryType, Header};

use super::*;

#[derive(Default)]
struct Layer(Vec<(String, EntryType, Vec<u8>, String, u32, u64)>);

impl Layer {
    fn file(mut self, name: &str, data: &str) -> Self {
        self.0.push((
            name.into(),
            EntryType::Regular,
            data.as_bytes().to_vec(),
            String::new(),
            0o644,
            0,
        ));
        self
    }
    fn dir(mut self, name: &str) -> Self {
        self.0.push((
            name.into(),
            EntryType::Directory,
            vec![],
            String::new(),
            0o755,
            0,
        ));
        self
    }
    fn link(mut self, kind: EntryType, name: &str, target: &str) -> Self {
        self.0
            .push((name.into(), kind, vec![], target.into(), 0o777, 0));
        self
    }
    fn owned(mut self, name: &str, mode: u32, uid: u64) -> Self {
        self.0.push((
            name.into(),
            EntryType::Regular,
            b"x".to_vec(),
            String::new(),
            mode,
            uid,
        ));
        self
    }
    fn tar(&self) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, data, link, mode, uid) in &self.0 {
            let mut h = Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(*mode);
            h.set_uid(*uid);
            h.set_gid(*uid);
            h.set_mtime(1_600_000_000);
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            h.set_cksum();
            b.append(&h, data.as_slice()).unwrap();
        }
        b.into_inner().unwrap()
    }
    fn apply(&self, root: &Path) -> Result<LayerStats, UnpackError> {
        apply_layer(root, self.tar().as_slice())
    }
}

fn read(root: &Path, p: &str) -> String {
    fs::read_to_string(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
}

#[test]
fn whiteouts_and_opaque_directories_hide_lower_layers_only() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    Layer::default()
        .dir("etc/")
        .file("etc/keep", "k")
        .file("etc/gone", "g")
        .dir("opq/")
        .file("opq/old", "o")
        .dir("opq/sub/")
        .file("opq/sub/deep", "d")
        .apply(root)
        .unwrap();
    let stats = Layer::default()
        .file("etc/.wh.gone", "")
        .file("opq/new-before", "n") // created by this layer before the marker: kept
        .file("opq/.wh..wh..opq", "")
        .file("opq/new", "n")
        .file(".wh.does-not-exist", "")
        .apply(root)
        .unwrap();
    assert_eq!(stats.whiteouts, 3);
    assert_eq!(read(root, "etc/keep"), "k");
    assert!(!root.join("etc/gone").exists());
    assert!(!root.join("etc/.wh.gone").exists());
    assert!(!root.join("opq/old").exists() && !root.join("opq/sub").exists());
    assert_eq!(read(root, "opq/new"), "n");
    assert_eq!(read(root, "opq/new-before"), "n");
    assert!(!root.join("opq/.wh..wh..opq").exists());
}

#[test]
fn symlinks_hardlinks_modes_and_owners() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    Layer::default()
        .file("./bin/tool", "#!/bin/sh\n")
        .link(EntryType::Symlink, "bin/sh", "/bin/tool")
        .link(EntryType::Link, "bin/tool2", "./bin/tool")
        .owned("setuid", 0o4755, 1000)
        .apply(root)
        .unwrap();
    assert_eq!(
        fs::read_link(root.join("bin/sh")).unwrap(),
        Path::new("/bin/tool")
    );
    let (a, b) = (
        fs::metadata(root.join("bin/tool")).unwrap(),
        fs::metadata(root.join("bin/tool2")).unwrap(),
    );
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    let m = fs::metadata(root.join("setuid")).unwrap();
    assert_eq!(
        (m.permissions().mode() & 0o7777, m.uid(), m.gid()),
        (0o4755, 1000, 1000)
    );
    assert_eq!(m.mtime(), 1_600_000_000);
    assert_eq!(
        fs::metadata(root.join("bin")).unwrap().mode() & 0o777,
        0o755
    );
}

#[test]
fn later_entries_replace_earlier_ones_of_another_type() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    Layer::default()
        .file("a/x", "1")
        .file("b", "2")
        .apply(root)
        .unwrap();
    Layer::default()
        .file("a", "file now")
        .dir("b/")
        .file("b/c", "3")
        .apply(root)
        .unwrap();
    assert_eq!(read(root, "a"), "file now");
    assert_eq!(read(root, "b/c"), "3");
}

#[test]
fn parent_symlinks_resolve_inside_the_root() {
    // usrmerge: /bin -> usr/bin in one layer, bin/ls in the next lands in usr/bin.
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    fs::create_dir(&root).unwrap();
    Layer::default()
        .dir("usr/bin/")
        .link(EntryType::Symlink, "bin", "usr/bin")
        .apply(&root)
        .unwrap();
    Layer::default().file("bin/ls", "ls").apply(&root).unwrap();
    assert_eq!(read(&root, "usr/bin/ls"), "ls");
    assert!(fs::symlink_metadata(root.join("bin"))
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn tar_slip_is_rejected_and_nothing_lands_outside() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let outside = t.path().join("outside");
    fs::create_dir_all(&root).unwrap();
    fs::create_dir_all(&outside).unwrap();

    for (layer, why) in [
        (Layer::default().file("../escape", "x"), "\"..\""),
        (Layer::default().file("a/../../escape", "x"), "\"..\""),
        (Layer::default().file("/abs-escape", "x"), "absolute"),
        (
            Layer::default().link(EntryType::Link, "hl", "../outside/victim"),
            "\"..\"",
        ),
        (Layer::default().file(".wh...", ""), "whiteout"),
    ] {
        let err = layer.apply(&root).unwrap_err();
        assert!(
            matches!(&err, UnpackError::Unsafe(m) if m.contains(why)),
            "{err}"
        );
    }
    // Symlinks planted by an earlier entry or layer are resolved inside the root.
    let abs = outside.to_str().unwrap().to_string();
    Layer::default()
        .link(EntryType::Symlink, "evil-abs", &abs)
        .link(EntryType::Symlink, "evil-rel", "../../../../../..")
        .file("evil-abs/pwned", "x")
        .file("evil-rel/pwned2", "x")
        .apply(&root)
        .unwrap();
    Layer::default()
        .file("evil-abs/pwned3", "x")
        .link(EntryType::Symlink, "evil-file", &format!("{abs}/victim"))
        .apply(&root)
        .unwrap();
    // Writing to a path that is a symlink replaces the symlink, never its target.
    fs::write(outside.join("victim"), "safe").unwrap();
    Layer::default()
        .file("evil-file", "overwritten?")
        .apply(&root)
        .unwrap();
    assert_eq!(fs::read_to_string(outside.join("victim")).unwrap(), "safe");
    assert_eq!(read(&root, "evil-file"), "overwritten?");
    // A whiteout through a symlink removes inside the root only.
    Layer::default()
        .file("evil-abs/.wh.victim", "")
        .apply(&root)
        .unwrap();
    assert!(outside.join("victim").exists());

    let outside_entries: Vec<_> = fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(outside_entries, vec![std::ffi::OsString::from("victim")]);
    assert!(!t.path().join("escape").exists() && !Path::new("/abs-escape").exists());
    assert_eq!(
        read(&root, format!("{abs}/pwned").trim_start_matches('/')),
        "x"
    );
    assert_eq!(read(&root, "pwned2"), "x");
}

#[test]
fn truncated_tar_is_corrupt() {
    let t = tempfile::tempdir().unwrap();
    let tar = Layer::default().file("big", &"y".repeat(5000)).tar();
    let err = apply_layer(t.path(), &tar[..2048]).unwrap_err();
    assert!(matches!(err, UnpackError::Corrupt(_)), "{err}");
}
