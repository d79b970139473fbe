//! `kiln commit`: the upper dir as one layer on the image's layers; pausing the container meanwhile.

use super::*;

/// Writes the container's upper dir (without kiln's mount points) as a new layer on top of
/// `base`'s layers and records an image with `config` (whose history the caller has extended).
/// The image is untagged.
pub fn commit(
    store: &kiln_cache::Store,
    base: &Image,
    rootfs: &RootfsPaths,
    mount_targets: &[String],
    config: &ImageConfig,
) -> Result<Image> {
    let opts = DiffOptions {
        source_date_epoch: None,
        exclude: created_mount_points(rootfs, mount_targets),
        donor: None,
        below: Vec::new(),
    };
    let mut writer = store
        .content()
        .prehashed_writer()
        .map_err(|e| FsError::StoreLayer(Box::new(e)))?;
    let stats = layer::write_diff(&rootfs.upper, &mut writer, &opts).map_err(FsError::Tar)?;
    let staged = writer
        .finish(Some(&stats.diff_id))
        .map_err(|e| FsError::StoreLayer(Box::new(e)))?;
    let size = staged.size();
    let blob = staged.commit().map_err(|e| FsError::StoreLayer(Box::new(e)))?;
    let mut layers: Vec<LayerRef> = base
        .layers
        .iter()
        .map(|l| LayerRef {
            digest: l.digest,
            diff_id: l.diff_id,
            size: l.descriptor.size(),
            media_type: l.descriptor.media_type().clone(),
        })
        .collect();
    layers.push(LayerRef {
        digest: blob,
        diff_id: stats.diff_id,
        size,
        media_type: oci_spec::image::MediaType::ImageLayer,
    });
    store
        .images()
        .create(config, &layers)
        .map_err(|e| FsError::CreateImage(Box::new(e)))
}

/// The processes of a container stopped with `SIGSTOP` (`commit --pause`), continued on drop.
#[derive(Debug)]
pub struct Paused {
    pids: Vec<i32>,
}

impl Drop for Paused {
    fn drop(&mut self) {
        for pid in &self.pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGCONT,
            );
        }
    }
}

/// Stops every process in the pid namespace of `pid` (the container's pid 1 as the host sees
/// it) until the returned guard is dropped.
pub fn pause(pid: i32) -> Result<Paused> {
    let ns = fs::read_link(format!("/proc/{pid}/ns/pid")).map_err(|source| FsError::Signal {
        action: "pause",
        pid,
        source,
    })?;
    let mut paused = Paused { pids: Vec::new() };
    let entries = fs::read_dir("/proc").map_err(|source| FsError::ReadDir {
        path: "/proc".into(),
        source,
    })?;
    for e in entries.flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if fs::read_link(format!("/proc/{p}/ns/pid")).ok().as_ref() != Some(&ns) {
            continue;
        }
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::Signal::SIGSTOP) {
            Ok(()) => paused.pids.push(p),
            Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => {
                return Err(FsError::Signal {
                    action: "pause",
                    pid: p,
                    source: io::Error::from(e),
                })
            }
        }
    }
    Ok(paused)
}
