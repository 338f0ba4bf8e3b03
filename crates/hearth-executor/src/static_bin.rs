//! Helper binaries that scripts/install.sh builds statically for the guest
//! target (`hearth-guest`, the VMs' PID 1; `hearth-sandbox`, the host
//! sandbox's), found near the running binary.

use std::path::{Path, PathBuf};

/// True when the ELF file has no program interpreter (PT_INTERP), i.e. it
/// can run as PID 1 of an initramfs that has no dynamic loader.
pub fn is_static_elf(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as usize)
    };
    if bytes.get(..4) != Some(b"\x7fELF") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    const PT_INTERP: u32 = 3;
    (0..phnum).all(|i| {
        let at = phoff + i * phentsize;
        bytes
            .get(at..at + 4)
            .is_some_and(|t| u32::from_le_bytes([t[0], t[1], t[2], t[3]]) != PT_INTERP)
    })
}

/// A statically linked helper binary built by scripts/install.sh for the
/// guest target (`hearth-guest`, `hearth-sandbox`), found near this binary.
pub fn find_static_binary(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [
        dir.join("../x86_64-unknown-linux-gnu/release").join(name),
        dir.join("../../x86_64-unknown-linux-gnu/release")
            .join(name),
        dir.join(name),
    ]
    .into_iter()
    .find(|c| is_static_elf(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_and_dynamic_executables_are_told_apart() {
        assert!(
            !is_static_elf(Path::new("/bin/sh")),
            "/bin/sh is dynamically linked"
        );
        assert!(
            is_static_elf(Path::new("/bin/busybox")),
            "busybox-static is static"
        );
        assert!(!is_static_elf(Path::new("/etc/hostname")));
    }
}
