//! Bad input to the shipped `microvm` binary: each case must end with a
//! non-zero status and exactly one line on stderr, never a panic. These run
//! on this machine directly; no guest boots.

use std::io::Write;
use std::process::Command;

use e2e::Assets;

fn refuse(args: &[&str], expect_in_message: &str) {
    let microvm = Assets::load().binary("microvm");
    let output = Command::new(&microvm)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", microvm.display()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let code = output.status.code();
    assert!(
        matches!(code, Some(c) if c != 0),
        "{args:?}: expected a non-zero exit, got {code:?}; stderr: {stderr}"
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "{args:?}: stderr must be one line: {stderr:?}"
    );
    assert!(stderr.starts_with("microvm: "), "{args:?}: {stderr:?}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr:?}");
    assert!(
        stderr.contains(expect_in_message),
        "{args:?}: expected {expect_in_message:?} in {stderr:?}"
    );
}

/// A readable file, removed on drop, that is certainly no kernel.
struct NotAKernel(std::path::PathBuf);

impl NotAKernel {
    fn new() -> NotAKernel {
        let path = std::env::temp_dir().join(format!(
            "microvm-e2e-not-a-kernel-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let mut file = std::fs::File::create(&path).expect("create temp file");
        file.write_all(b"#!/bin/sh\necho this is not a kernel\n")
            .expect("write temp file");
        NotAKernel(path)
    }

    fn as_str(&self) -> &str {
        self.0.to_str().expect("temp paths are UTF-8")
    }
}

impl Drop for NotAKernel {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn missing_kernel() {
    refuse(
        &["--kernel", "/nonexistent"],
        "cannot read kernel '/nonexistent'",
    );
}

#[test]
fn kernel_that_is_a_directory() {
    refuse(&["--kernel", "/"], "not a regular file");
}

#[test]
fn file_that_is_not_a_kernel() {
    let file = NotAKernel::new();
    refuse(&["--kernel", file.as_str()], "is not a Linux kernel");
}

#[test]
fn missing_initramfs() {
    let file = NotAKernel::new();
    refuse(
        &["--kernel", file.as_str(), "--initramfs", "/nonexistent.img"],
        "cannot read initramfs",
    );
}

#[test]
fn memory_too_small() {
    let file = NotAKernel::new();
    refuse(
        &["--kernel", file.as_str(), "--memory", "size=1M"],
        "below the minimum",
    );
}

#[test]
fn memory_larger_than_the_host() {
    let file = NotAKernel::new();
    refuse(
        &["--kernel", file.as_str(), "--memory", "size=100000G"],
        "more than this host has",
    );
}

#[test]
fn malformed_memory_size() {
    refuse(
        &["--kernel", "/nonexistent", "--memory", "size=12Q"],
        "malformed size '12Q'",
    );
}

#[test]
fn zero_cpus() {
    refuse(
        &["--kernel", "/nonexistent", "--cpus", "0"],
        "--cpus must be at least 1",
    );
}

#[test]
fn more_cpus_than_allowed() {
    refuse(
        &["--kernel", "/nonexistent", "--cpus", "4096"],
        "above the limit",
    );
}

#[test]
fn unknown_option() {
    refuse(
        &["--kernel", "/nonexistent", "--frobnicate"],
        "--frobnicate",
    );
}

#[test]
fn missing_required_kernel() {
    refuse(&["--cpus", "1"], "--kernel");
}

#[test]
fn malformed_serial() {
    refuse(
        &["--kernel", "/nonexistent", "--serial", "tty"],
        "malformed serial option",
    );
}

#[test]
fn command_line_too_long() {
    let file = NotAKernel::new();
    let long = "x".repeat(3000);
    refuse(
        &["--kernel", file.as_str(), "--cmdline", &long],
        "accepts at most 2047",
    );
}

#[test]
fn a_key_given_twice_in_an_option() {
    refuse(
        &[
            "--kernel",
            "/nonexistent",
            "--memory",
            "size=512M,hotplug=1G,block=4M,block=2M",
        ],
        "'block' is given more than once",
    );
}

#[test]
fn a_mac_byte_with_a_sign() {
    refuse(
        &[
            "--kernel",
            "/nonexistent",
            "--net",
            "vdpa=/dev/vhost-vdpa-0,mac=+1:22:33:44:55:66",
        ],
        "malformed MAC address",
    );
}

#[test]
fn a_serial_cap_of_zero() {
    refuse(
        &["--kernel", "/nonexistent", "--serial", "file=/tmp/x,max=0"],
        "malformed serial option",
    );
}

/// A directory of its own for one API socket case, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let path =
            std::env::temp_dir().join(format!("microvm-e2e-api-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    fn socket(&self) -> String {
        self.0
            .join("api.sock")
            .to_str()
            .expect("temp paths are UTF-8")
            .to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// These API socket cases give a file that is no kernel: that is found
// only when the kernel is loaded, after the VM is built. An API socket
// error reported instead shows the socket is checked before any of it.

#[test]
fn an_api_socket_path_holding_a_file_is_refused_before_the_vm_is_built() {
    let kernel = NotAKernel::new();
    let dir = TempDir::new("file");
    let socket = dir.socket();
    std::fs::write(&socket, b"precious").expect("write temp file");
    refuse(
        &["--kernel", kernel.as_str(), "--api-socket", &socket],
        "it exists and is not a socket",
    );
    assert_eq!(std::fs::read(&socket).expect("the file stays"), b"precious");
}

#[test]
fn an_api_socket_in_a_missing_directory_is_refused_before_the_vm_is_built() {
    let kernel = NotAKernel::new();
    let dir = TempDir::new("missing");
    let socket = format!("{}/nowhere/api.sock", dir.0.display());
    refuse(
        &["--kernel", kernel.as_str(), "--api-socket", &socket],
        &format!("cannot bind the API socket '{socket}': No such file or directory"),
    );
}

#[test]
fn a_live_api_socket_of_another_vmm_is_refused_before_the_vm_is_built() {
    let kernel = NotAKernel::new();
    let dir = TempDir::new("live");
    let socket = dir.socket();
    let _other = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    refuse(
        &["--kernel", kernel.as_str(), "--api-socket", &socket],
        "is in use by a running process",
    );
    std::os::unix::net::UnixStream::connect(&socket).expect("the live socket is untouched");
}

#[test]
fn a_build_that_fails_leaves_no_api_socket_behind() {
    let kernel = NotAKernel::new();
    let dir = TempDir::new("leftover");
    let socket = dir.socket();
    refuse(
        &["--kernel", kernel.as_str(), "--api-socket", &socket],
        "is not a Linux kernel",
    );
    assert!(
        std::fs::symlink_metadata(&socket).is_err(),
        "{socket} was left behind"
    );
}
