//! The unpacker against crafted archives: each attack must leave nothing
//! outside the fresh input root.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tar::{EntryType, Header};
use tonic::Code;

use super::*;

struct Case {
    _tmp: tempfile::TempDir,
    outside: PathBuf,
    ws: PathBuf,
    image: PathBuf,
}

impl Case {
    fn new() -> Case {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        let ws = tmp.path().join("ws");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::create_dir_all(ws.join("root")).unwrap();
        std::fs::write(ws.join("root/stale-input"), b"from the store").unwrap();
        std::fs::write(outside.join("target"), b"precious").unwrap();
        Case {
            image: tmp.path().join("out.img"),
            outside,
            ws,
            _tmp: tmp,
        }
    }

    fn root(&self) -> PathBuf {
        self.ws.join("root")
    }

    fn run_wd(&self, archive: &[u8], wd: &str, limits: Limits) -> Result<(), ExecError> {
        // Like the real disk: the archive, then zeros to the disk's size.
        let mut disk = archive.to_vec();
        disk.resize(archive.len() + 64 * 1024, 0);
        std::fs::write(&self.image, disk).unwrap();
        let root = self.root();
        let (so, se) = (self.ws.join("stdout"), self.ws.join("stderr"));
        let t = Target {
            input_root: &root,
            stdout: &so,
            stderr: &se,
            working_directory: wd,
            label: "microVM test-vm",
        };
        unpack(&self.image, limits, &t)
    }

    fn run(&self, archive: &[u8]) -> Result<(), ExecError> {
        self.run_wd(archive, "", LIMITS)
    }

    /// Nothing outside the root changed.
    fn assert_outside_untouched(&self) {
        let mut names: Vec<_> = std::fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["target"]);
        assert_eq!(
            std::fs::read(self.outside.join("target")).unwrap(),
            b"precious"
        );
        let mut ws: Vec<_> = std::fs::read_dir(&self.ws)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        ws.sort();
        assert_eq!(ws, ["root", "stderr", "stdout"]);
    }
}

const LIMITS: Limits = Limits {
    max_bytes: 1 << 20,
    max_entries: 1000,
};

fn refused(r: Result<(), ExecError>, needle: &str) -> String {
    let e = r.expect_err("the archive must be refused");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    let msg = e.to_string();
    assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
    msg
}

/// A header written byte by byte, for what tar::Builder refuses to write.
fn raw(out: &mut Vec<u8>, name: &[u8], kind: EntryType, data: &[u8], link: &[u8]) {
    let mut h = Header::new_gnu();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

fn end(mut out: Vec<u8>) -> Vec<u8> {
    out.extend_from_slice(&[0; 1024]);
    out
}

fn builder() -> tar::Builder<Vec<u8>> {
    tar::Builder::new(Vec::new())
}

fn file(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8], mode: u32) {
    let mut h = Header::new_gnu();
    h.set_entry_type(EntryType::Regular);
    h.set_mode(mode);
    h.set_size(data.len() as u64);
    b.append_data(&mut h, name, data).unwrap();
}

fn symlink(b: &mut tar::Builder<Vec<u8>>, name: &str, target: &str) {
    let mut h = Header::new_gnu();
    h.set_entry_type(EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, name, target).unwrap();
}

fn dir(b: &mut tar::Builder<Vec<u8>>, name: &str) {
    let mut h = Header::new_gnu();
    h.set_entry_type(EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    b.append_data(&mut h, name, std::io::empty()).unwrap();
}

fn special(b: &mut tar::Builder<Vec<u8>>, name: &str, kind: EntryType) {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(0);
    b.append_data(&mut h, name, std::io::empty()).unwrap();
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn logs_files_dirs_symlinks_and_long_names_round_trip() {
    let c = Case::new();
    let mut b = builder();
    file(&mut b, "stdout", b"printed", 0o644);
    file(&mut b, "stderr", b"warned", 0o644);
    dir(&mut b, "root/out");
    file(&mut b, "root/out/tool", b"#!/bin/sh", 0o4755);
    file(&mut b, "root/out/data", b"bytes", 0o666);
    symlink(&mut b, "root/out/link", "tool");
    let long = format!("root/out/{}/{}", "d".repeat(120), "f".repeat(120));
    file(&mut b, &long, b"deep", 0o644);
    symlink(&mut b, "root/far", &"../".repeat(60));
    file(&mut b, "root/implicit/parent/file", b"x", 0o644);
    c.run(&b.into_inner().unwrap()).unwrap();

    let r = c.root();
    assert!(!r.join("stale-input").exists(), "the root is fresh");
    assert_eq!(std::fs::read(c.ws.join("stdout")).unwrap(), b"printed");
    assert_eq!(std::fs::read(c.ws.join("stderr")).unwrap(), b"warned");
    assert_eq!(std::fs::read(r.join("out/tool")).unwrap(), b"#!/bin/sh");
    assert_eq!(mode(&r.join("out/tool")), 0o755, "no setuid, ever");
    assert_eq!(mode(&r.join("out/data")), 0o644);
    assert_eq!(
        std::fs::read_link(r.join("out/link")).unwrap(),
        Path::new("tool")
    );
    assert_eq!(std::fs::read(r.join(&long[5..])).unwrap(), b"deep");
    assert_eq!(
        std::fs::read_link(r.join("far")).unwrap(),
        Path::new(&"../".repeat(60))
    );
    assert_eq!(std::fs::read(r.join("implicit/parent/file")).unwrap(), b"x");
    c.assert_outside_untouched();
}

#[test]
fn missing_logs_are_empty_files() {
    let c = Case::new();
    c.run(&end(Vec::new())).unwrap();
    assert_eq!(std::fs::read(c.ws.join("stdout")).unwrap(), b"");
    assert_eq!(std::fs::read(c.ws.join("stderr")).unwrap(), b"");
    assert_eq!(std::fs::read_dir(c.root()).unwrap().count(), 0);
}

#[test]
fn nothing_is_written_through_a_symlink() {
    for target in ["../../outside", "/etc"] {
        let c = Case::new();
        let mut b = builder();
        symlink(&mut b, "root/x", target);
        file(&mut b, "root/x/pwned", b"owned", 0o644);
        refused(c.run(&b.into_inner().unwrap()), "is a symlink");
        assert!(!Path::new("/etc/pwned").exists());
        c.assert_outside_untouched();

        // Nor a directory made through one.
        let c = Case::new();
        let mut b = builder();
        symlink(&mut b, "root/x", target);
        dir(&mut b, "root/x/sub");
        refused(c.run(&b.into_inner().unwrap()), "is a symlink");
        c.assert_outside_untouched();
    }
}

#[test]
fn names_that_climb_out_or_are_absolute_are_refused() {
    let c = Case::new();
    let abs = format!("{}/abs", c.outside.display());
    for name in [
        "root/../escape",
        "root/a/../../escape",
        "../escape",
        abs.as_str(),
        "/etc/pwned",
        "root//x",
        "root/./x",
        "elsewhere/x",
        "root",
    ] {
        let mut a = Vec::new();
        raw(&mut a, name.as_bytes(), EntryType::Regular, b"owned", b"");
        let e = c.run(&end(a));
        assert!(e.is_err(), "{name:?} was accepted");
        assert_eq!(e.unwrap_err().code(), Code::FailedPrecondition, "{name}");
        assert!(!c.ws.join("escape").exists());
        assert!(!Path::new("/etc/pwned").exists());
        c.assert_outside_untouched();
    }
}

#[test]
fn a_name_appears_once() {
    // A file then a symlink of the same name, and a symlink then a file
    // (which must not write through the symlink).
    let c = Case::new();
    let mut b = builder();
    file(&mut b, "root/f", b"first", 0o644);
    symlink(&mut b, "root/f", "../../outside/target");
    refused(c.run(&b.into_inner().unwrap()), "twice");
    c.assert_outside_untouched();

    let c = Case::new();
    let mut b = builder();
    symlink(&mut b, "root/f", "../../outside/target");
    file(&mut b, "root/f", b"overwritten", 0o644);
    refused(c.run(&b.into_inner().unwrap()), "twice");
    c.assert_outside_untouched();

    // Spelled differently: a trailing slash.
    let c = Case::new();
    let mut a = Vec::new();
    raw(&mut a, b"root/d/", EntryType::Directory, b"", b"");
    raw(&mut a, b"root/d", EntryType::Directory, b"", b"");
    refused(c.run(&end(a)), "twice");

    // A symlink over an implicitly made directory is refused too.
    let c = Case::new();
    let mut b = builder();
    file(&mut b, "root/d/f", b"x", 0o644);
    symlink(&mut b, "root/d", "../../outside");
    refused(c.run(&b.into_inner().unwrap()), "cannot be created");
    c.assert_outside_untouched();

    let c = Case::new();
    let mut b = builder();
    file(&mut b, "stdout", b"a", 0o644);
    file(&mut b, "stdout", b"b", 0o644);
    refused(c.run(&b.into_inner().unwrap()), "twice");
}

#[test]
fn hard_links_and_other_types_are_refused() {
    let c = Case::new();
    let mut a = Vec::new();
    raw(
        &mut a,
        b"root/h",
        EntryType::Link,
        b"",
        c.outside.join("target").to_str().unwrap().as_bytes(),
    );
    refused(c.run(&end(a)), "hard link");
    c.assert_outside_untouched();

    for kind in [
        EntryType::GNUSparse,
        EntryType::Continuous,
        EntryType::XHeader,
    ] {
        let mut a = Vec::new();
        raw(&mut a, b"root/odd", kind, b"", b"");
        let e = c.run(&end(a));
        assert_eq!(
            e.expect_err("refused").code(),
            Code::FailedPrecondition,
            "{kind:?}"
        );
    }
    let mut a = Vec::new();
    raw(&mut a, b"stdout", EntryType::Symlink, b"", b"/etc/shadow");
    refused(c.run(&end(a)), "not a regular file");
}

#[test]
fn fifos_sockets_and_devices_are_failed_preconditions_naming_the_output() {
    let c = Case::new();
    let mut b = builder();
    special(&mut b, "root/out", EntryType::Fifo);
    let msg = refused(c.run(&b.into_inner().unwrap()), "\"out\" is a FIFO");
    assert_eq!(
        msg,
        "output \"out\" is a FIFO; outputs must be regular files, directories or symlinks"
    );

    // Named relative to the working directory, as the executor names outputs.
    let mut b = builder();
    dir(&mut b, "root/wd/d");
    special(&mut b, "root/wd/d/sock", EntryType::new(SOCKET_ENTRY_TYPE));
    let e = c.run_wd(&b.into_inner().unwrap(), "wd", LIMITS);
    refused(e, "output \"d/sock\" is a socket");

    let mut b = builder();
    special(&mut b, "root/dev", EntryType::Char);
    refused(c.run(&b.into_inner().unwrap()), "\"dev\" is a device");
    assert!(!c.root().join("dev").exists());
}

#[test]
fn sizes_and_counts_are_bounded() {
    let c = Case::new();
    let small = Limits {
        max_bytes: 100,
        max_entries: 3,
    };
    let mut b = builder();
    file(&mut b, "root/big", &[7; 101], 0o644);
    refused(
        c.run_wd(&b.into_inner().unwrap(), "", small),
        "exceed the output disk",
    );

    // The budget is the total, not per entry.
    let mut b = builder();
    file(&mut b, "root/a", &[7; 60], 0o644);
    file(&mut b, "root/b", &[7; 60], 0o644);
    refused(
        c.run_wd(&b.into_inner().unwrap(), "", small),
        "exceed the output disk",
    );

    let mut b = builder();
    for i in 0..4 {
        file(&mut b, &format!("root/{i}"), b"", 0o644);
    }
    refused(
        c.run_wd(&b.into_inner().unwrap(), "", small),
        "more than 3 entries",
    );

    // An entry claiming more than the disk holds: never read past its end.
    let mut h = Header::new_gnu();
    h.set_path("root/huge").unwrap();
    h.set_entry_type(EntryType::Regular);
    h.set_size(1 << 40);
    h.set_cksum();
    std::fs::write(&c.image, h.as_bytes()).unwrap();
    let root = c.root();
    let (so, se) = (c.ws.join("stdout"), c.ws.join("stderr"));
    let t = Target {
        input_root: &root,
        stdout: &so,
        stderr: &se,
        working_directory: "",
        label: "microVM test-vm",
    };
    let big = Limits {
        max_bytes: 1 << 41,
        max_entries: 10,
    };
    refused(unpack(&c.image, big, &t), "malformed");

    // A long name beyond the bound is not read into memory.
    let mut a = Vec::new();
    raw(
        &mut a,
        b"././@LongLink",
        EntryType::GNULongName,
        &[b'a'; MAX_NAME as usize + 1],
        b"",
    );
    raw(&mut a, b"root/x", EntryType::Regular, b"", b"");
    refused(c.run(&end(a)), "long name");
}

#[test]
fn garbage_is_a_clear_error() {
    let c = Case::new();
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    let msg = refused(c.run(&garbage), "malformed");
    assert!(msg.contains("test-vm"), "names the VM: {msg}");
    c.assert_outside_untouched();
}
