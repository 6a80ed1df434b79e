//! Finding the vhost-vdpa character device of a vdpa device: vhost_vdpa binds the
//! device and registers `vhost-vdpa-K` as its child (/sys/bus/vdpa/devices/NAME/
//! vhost-vdpa-K); devtmpfs then creates /dev/vhost-vdpa-K. Both are waited for, with
//! a bound.

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use thiserror::Error;

pub const SYSFS_VDPA_DEVICES: &str = "/sys/bus/vdpa/devices";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NodeError {
    #[error("vdpa device {name:?}: no such device in {SYSFS_VDPA_DEVICES} within {secs} s")]
    NoDevice { name: String, secs: u64 },
    #[error("vdpa device {name:?}: vhost_vdpa did not bind it within {secs} s (is vhost_vdpa loaded and virtio_vdpa not? driver: {driver})")]
    NotBound {
        name: String,
        secs: u64,
        driver: String,
    },
    #[error("{path} did not appear within {secs} s")]
    NoNode { path: String, secs: u64 },
    #[error("vdpa device name {0:?} is not a plain file name")]
    BadName(String),
}

/// The `vhost-vdpa-K` entry in a vdpa device's sysfs directory, if any.
pub fn find_vhost_child(dir: &Path) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.strip_prefix("vhost-vdpa-")
                .is_some_and(|k| !k.is_empty() && k.bytes().all(|c| c.is_ascii_digit()))
        })
        .collect();
    names.sort();
    names.into_iter().next()
}

fn driver_of(dir: &Path) -> String {
    std::fs::read_link(dir.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "none".to_string())
}

/// Waits until vdpa device `name` (under `sysfs`) has a vhost-vdpa child and its node
/// exists under `dev`; returns the node's path.
pub fn wait_vhost_node_in(
    sysfs: &Path,
    dev: &Path,
    name: &str,
    timeout: Duration,
) -> Result<PathBuf, NodeError> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(NodeError::BadName(name.to_string()));
    }
    let dir = sysfs.join(name);
    let deadline = Instant::now() + timeout;
    let secs = timeout.as_secs();
    let child = loop {
        if let Some(c) = find_vhost_child(&dir) {
            break c;
        }
        if Instant::now() >= deadline {
            if !dir.exists() {
                return Err(NodeError::NoDevice {
                    name: name.to_string(),
                    secs,
                });
            }
            return Err(NodeError::NotBound {
                name: name.to_string(),
                secs,
                driver: driver_of(&dir),
            });
        }
        thread::sleep(Duration::from_millis(20));
    };
    let path = dev.join(&child);
    while !path.exists() {
        if Instant::now() >= deadline {
            return Err(NodeError::NoNode {
                path: path.display().to_string(),
                secs,
            });
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(path)
}

/// [`wait_vhost_node_in`] on /sys/bus/vdpa/devices and /dev.
pub fn wait_vhost_node(name: &str, timeout: Duration) -> Result<PathBuf, NodeError> {
    wait_vhost_node_in(
        Path::new(SYSFS_VDPA_DEVICES),
        Path::new("/dev"),
        name,
        timeout,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vdpa-mgmt-node-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("sys")).unwrap();
        std::fs::create_dir_all(d.join("dev")).unwrap();
        d
    }

    #[test]
    fn finds_the_node_once_both_exist() {
        let d = scratch("ok");
        std::fs::create_dir_all(d.join("sys/sim0/vhost-vdpa-3")).unwrap();
        std::fs::create_dir_all(d.join("sys/sim0/power")).unwrap();
        let sys = d.join("sys");
        let dev = d.join("dev");
        // The node appears a little later, as devtmpfs creates it.
        let late = dev.join("vhost-vdpa-3");
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(100));
            std::fs::write(late, b"").unwrap();
        });
        let p = wait_vhost_node_in(&sys, &dev, "sim0", Duration::from_secs(5)).unwrap();
        t.join().unwrap();
        assert_eq!(p, dev.join("vhost-vdpa-3"));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn says_which_step_timed_out() {
        let d = scratch("late");
        let sys = d.join("sys");
        let dev = d.join("dev");
        let t = Duration::from_millis(100);
        assert!(matches!(
            wait_vhost_node_in(&sys, &dev, "nodev", t),
            Err(NodeError::NoDevice { .. })
        ));
        std::fs::create_dir_all(sys.join("unbound")).unwrap();
        let e = wait_vhost_node_in(&sys, &dev, "unbound", t).unwrap_err();
        assert!(matches!(e, NodeError::NotBound { ref driver, .. } if driver == "none"));
        std::fs::create_dir_all(sys.join("bound/vhost-vdpa-0")).unwrap();
        assert!(matches!(
            wait_vhost_node_in(&sys, &dev, "bound", t),
            Err(NodeError::NoNode { .. })
        ));
        assert_eq!(
            wait_vhost_node_in(&sys, &dev, "../x", t),
            Err(NodeError::BadName("../x".to_string()))
        );
        // Only vhost-vdpa-<digits> counts.
        std::fs::create_dir_all(sys.join("odd/vhost-vdpa-x")).unwrap();
        assert_eq!(find_vhost_child(&sys.join("odd")), None);
        let _ = std::fs::remove_dir_all(&d);
    }
}
