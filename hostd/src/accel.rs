//! Which accelerator QEMU may use here.
//!
//! An openable `/dev/kvm` is not proof that KVM works: on some machines it is a paravirtual
//! device on which stock guest kernels hang in the decompressor. With `accel = "auto"` hostd
//! therefore boots the real image once under KVM and uses KVM only if the agent says
//! `initialised` in time; the verdict is cached per (QEMU version, image digest) in the state
//! folder so the probe runs once per host and image.

use crate::config::{AccelChoice, ImageConfig};
use crate::driver::qemu::{qemu_version, Accel, QemuDriver};
use crate::driver::{VmDriver, VmSpec};
use crate::image::Image;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct ProbeRecord {
    qemu_version: String,
    image_digest: String,
    kvm_boots: bool,
    detail: String,
}

/// Decides the accelerator. `probe_timeout` bounds the KVM trial boot.
pub async fn choose(
    choice: AccelChoice,
    qemu: &Path,
    image: Option<(&Image, &ImageConfig)>,
    state_dir: &Path,
    probe_timeout: Duration,
) -> Accel {
    match choice {
        AccelChoice::Tcg => return Accel::Tcg,
        AccelChoice::Kvm => return Accel::Kvm,
        AccelChoice::Auto => {}
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        tracing::info!("no usable /dev/kvm: using TCG");
        return Accel::Tcg;
    }
    let Some((image, config)) = image else {
        return Accel::Tcg;
    };
    let Ok(version) = qemu_version(qemu).await else {
        return Accel::Tcg;
    };
    let cache = state_dir.join("accel-probe.json");
    if let Some(rec) = std::fs::read(&cache)
        .ok()
        .and_then(|b| serde_json::from_slice::<ProbeRecord>(&b).ok())
    {
        if rec.qemu_version == version && rec.image_digest == image.manifest.digest {
            return if rec.kvm_boots {
                Accel::Kvm
            } else {
                Accel::Tcg
            };
        }
    }
    let (kvm_boots, detail) = probe_kvm(qemu, image, config, state_dir, probe_timeout).await;
    tracing::info!(kvm_boots, %detail, "KVM probe");
    let rec = ProbeRecord {
        qemu_version: version,
        image_digest: image.manifest.digest.clone(),
        kvm_boots,
        detail,
    };
    let _ = std::fs::create_dir_all(state_dir);
    let _ = std::fs::write(&cache, serde_json::to_vec_pretty(&rec).unwrap_or_default());
    if kvm_boots {
        Accel::Kvm
    } else {
        Accel::Tcg
    }
}

async fn probe_kvm(
    qemu: &Path,
    image: &Image,
    config: &ImageConfig,
    state_dir: &Path,
    timeout: Duration,
) -> (bool, String) {
    let driver = match QemuDriver::new(qemu.to_path_buf(), Accel::Kvm).await {
        Ok(d) => d,
        Err(e) => return (false, e.to_string()),
    };
    let spec = VmSpec {
        image: image.clone(),
        config: config.clone(),
    };
    let dir = state_dir.join("vms").join("kvm-probe");
    let vm_id = berth_protocol::VmId::new("kvm-probe").expect("literal id is valid");
    match driver.cold_boot(&spec, vm_id, &dir, timeout).await {
        Ok(vm) => {
            vm.destroy().await;
            (true, "guest initialised under KVM".into())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            (false, format!("guest did not boot under KVM: {e}"))
        }
    }
}
