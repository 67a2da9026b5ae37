//! /dev/kvm: open it and check the API version. KVM is detected by using
//! it, never by CPU flags (the nested `kvm_pvm` here shows no vmx/svm).

use crate::VmmError;
use kvm_ioctls::Kvm;

/// The only stable KVM API version (KVM_GET_API_VERSION).
const KVM_API_VERSION: i32 = 12;

/// Open /dev/kvm, or explain in one line why it cannot be used.
pub fn open() -> Result<Kvm, VmmError> {
    let kvm = Kvm::new().map_err(|e| {
        let io = std::io::Error::from_raw_os_error(e.errno());
        let hint = match e.errno() {
            libc::EACCES | libc::EPERM => {
                " (needs read/write access to /dev/kvm, e.g. membership of the kvm group)"
            }
            libc::ENOENT | libc::ENODEV | libc::ENXIO => {
                " (is KVM enabled in the kernel and the kvm module loaded?)"
            }
            _ => "",
        };
        VmmError::NoKvm(format!(
            "cannot use /dev/kvm: {}{hint}",
            crate::os_error(io)
        ))
    })?;
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return Err(VmmError::NoKvm(format!(
            "cannot use /dev/kvm: KVM API version {version}, expected {KVM_API_VERSION}"
        )));
    }
    Ok(kvm)
}
