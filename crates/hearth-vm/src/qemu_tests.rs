use super::*;

#[tokio::test]
async fn a_vm_that_cannot_boot_reports_why() {
    let dir = tempfile::tempdir().unwrap();
    let vmm = QemuVmm {
        qemu: "qemu-system-x86_64".into(),
        boot: BootFiles {
            kernel: dir.path().join("no-such-kernel"),
            initramfs: dir.path().join("no-such-initramfs"),
        },
        accel: Accel::Tcg,
        tsc_khz: None,
        boot_timeout: Duration::from_secs(20),
        control_timeout: crate::deadline::CONTROL_TIMEOUT,
        forward_exe: "hearth".into(),
        version: String::new(),
        kernel_id: String::new(),
    };
    let spec = VmSpec {
        vcpus: 1,
        memory_mib: 128,
        disks: vec![],
        network: false,
        forwards: vec![],
        run_dir: dir.path().join("run"),
        memory_file: None,
        memory_private: false,
        incoming: None,
    };
    let err = vmm.boot(&spec).await.err().expect("boot must fail");
    let text = err.to_string();
    assert!(matches!(err, VmError::Boot { .. }), "{text}");
    assert!(
        text.contains("no-such-kernel"),
        "the reason names QEMU's complaint: {text}"
    );
}

/// A clone maps the snapshot's memory privately and sees its scratch
/// disk through a qcow2 overlay; everything else is as saved.
#[test]
fn a_clone_maps_memory_privately_and_names_its_disk_format() {
    let dir = tempfile::tempdir().unwrap();
    let vmm = QemuVmm {
        qemu: "qemu-system-x86_64".into(),
        boot: BootFiles {
            kernel: "/k".into(),
            initramfs: "/i".into(),
        },
        accel: Accel::Tcg,
        tsc_khz: None,
        boot_timeout: Duration::from_secs(20),
        control_timeout: crate::deadline::CONTROL_TIMEOUT,
        forward_exe: "hearth".into(),
        version: String::new(),
        kernel_id: String::new(),
    };
    let run = SocketDir::create_private(&dir.path().join("run")).unwrap();
    let spec = VmSpec {
        vcpus: 1,
        memory_mib: 512,
        disks: vec![crate::DiskSpec {
            path: "/snap/scratch.qcow2".into(),
            serial: "hearth-scratch".into(),
            read_only: false,
            format: DiskFormat::Qcow2,
        }],
        network: false,
        forwards: vec![],
        run_dir: dir.path().join("run"),
        memory_file: Some("/snap/mem".into()),
        memory_private: true,
        incoming: Some("/snap/state".into()),
    };
    let args = vmm.args(&spec, &run).join(" ");
    assert!(
        args.contains("memory-backend-file,id=mem,size=512M,mem-path=/snap/mem,share=off"),
        "{args}"
    );
    assert!(
        args.contains("file=/snap/scratch.qcow2,format=qcow2"),
        "{args}"
    );
    assert!(args.contains("-incoming defer"), "{args}");
}
