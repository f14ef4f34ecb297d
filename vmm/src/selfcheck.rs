//! `vmm selfcheck`: proves that this host's /dev/kvm can create a VM and a vCPU.
//!
//! The appliance runs it once at start and reports the result on its health
//! endpoint, so an operator sees a KVM problem before the first sandbox fails.

use kvm_ioctls::Kvm;

/// What the check found, printed as one JSON line.
pub struct SelfCheck {
    pub api_version: i32,
    pub max_vcpus: usize,
}

/// Opens /dev/kvm, creates a VM and one vCPU, and drops them again.
pub fn run() -> Result<SelfCheck, String> {
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let api_version = kvm.get_api_version();
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM failed: {e}"))?;
    vm.create_vcpu(0).map_err(|e| format!("KVM_CREATE_VCPU failed: {e}"))?;
    Ok(SelfCheck { api_version, max_vcpus: kvm.get_max_vcpus() })
}

impl SelfCheck {
    pub fn to_json(&self) -> String {
        format!("{{\"kvm\":\"ok\",\"apiVersion\":{},\"vcpu\":true,\"maxVcpus\":{}}}", self.api_version, self.max_vcpus)
    }
}

/// Error line with the message JSON-escaped (it comes from the OS, so it may hold quotes).
pub fn error_json(message: &str) -> String {
    let mut escaped = String::with_capacity(message.len());
    for c in message.chars() {
        match c {
            '"' => escaped.push_str("\\\""),
            '\\' => escaped.push_str("\\\\"),
            c if (c as u32) < 0x20 => escaped.push_str(&format!("\\u{:04x}", c as u32)),
            c => escaped.push(c),
        }
    }
    format!("{{\"kvm\":\"error\",\"error\":\"{escaped}\"}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_escapes_quotes_and_controls() {
        assert_eq!(error_json("bad \"x\"\n\\"), "{\"kvm\":\"error\",\"error\":\"bad \\\"x\\\"\\u000a\\\\\"}");
    }

    #[test]
    fn ok_json_has_the_fields_the_appliance_reads() {
        let line = SelfCheck { api_version: 12, max_vcpus: 8 }.to_json();
        assert_eq!(line, "{\"kvm\":\"ok\",\"apiVersion\":12,\"vcpu\":true,\"maxVcpus\":8}");
    }
}
