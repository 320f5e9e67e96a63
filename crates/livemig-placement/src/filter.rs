//! The filters: hard requirements a destination must meet.
//!
//! Every filter is evaluated for every host (not just up to the first
//! failure), so an excluded host carries all of its reasons, in this order:
//!
//! 1. `current_host` — the VM already runs there;
//! 2. `maintenance` — the host is in maintenance;
//! 3. `memory` — `memory_free_mib < vm.memory_mib + memory_headroom_mib`;
//! 4. `vcpu_overcommit` — `vcpus_allocated + vm.vcpus > cpus * vcpu_overcommit_ratio`;
//! 5. `cpu_features` — the host lacks a feature the VM requires;
//! 6. `anti_affinity` — the host carries a label the VM's anti-affinity lists.

use crate::config::PlacementConfig;
pub use crate::model::{Excluded, Reason};
use crate::model::{Host, Vm};

/// Runs every filter on `host`; an empty result means the host is eligible.
pub fn check(host: &Host, vm: &Vm, config: &PlacementConfig) -> Vec<Reason> {
    let mut reasons = Vec::new();
    if host.name == vm.current_host {
        reasons.push(Reason::CurrentHost);
    }
    if host.maintenance {
        reasons.push(Reason::Maintenance);
    }
    if host.memory_free_mib < vm.memory_mib.saturating_add(config.memory_headroom_mib) {
        reasons.push(Reason::Memory {
            free_mib: host.memory_free_mib,
            vm_mib: vm.memory_mib,
            headroom_mib: config.memory_headroom_mib,
        });
    }
    let wanted = u64::from(host.vcpus_allocated) + u64::from(vm.vcpus);
    if wanted as f64 > f64::from(host.cpus) * config.vcpu_overcommit_ratio {
        reasons.push(Reason::VcpuOvercommit {
            allocated: host.vcpus_allocated,
            requested: vm.vcpus,
            cpus: host.cpus,
            ratio: config.vcpu_overcommit_ratio,
        });
    }
    if !vm.required_cpu_features.is_subset(&host.cpu_features) {
        reasons.push(Reason::CpuFeatures {
            missing: vm
                .required_cpu_features
                .difference(&host.cpu_features)
                .cloned()
                .collect(),
        });
    }
    if !vm.anti_affinity.is_disjoint(&host.labels) {
        reasons.push(Reason::AntiAffinity {
            labels: vm
                .anti_affinity
                .intersection(&host.labels)
                .cloned()
                .collect(),
        });
    }
    reasons
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Host {
        Host {
            name: "h".to_string(),
            migration_address: "tcp:10.0.0.1:4444".to_string(),
            memory_total_mib: 16384,
            memory_free_mib: 8192,
            cpus: 4,
            cpu_load: 1.0,
            vcpus_allocated: 10,
            cpu_model: String::new(),
            cpu_features: ["aes", "avx2"].iter().map(|s| s.to_string()).collect(),
            link_bandwidth_mib_s: 1000,
            labels: ["rack:r1"].iter().map(|s| s.to_string()).collect(),
            maintenance: false,
            agent: None,
        }
    }

    fn vm() -> Vm {
        Vm {
            name: "v".to_string(),
            memory_mib: 4096,
            vcpus: 2,
            required_cpu_features: ["aes"].iter().map(|s| s.to_string()).collect(),
            dirty_rate_mib_s: 10,
            anti_affinity: ["group:web"].iter().map(|s| s.to_string()).collect(),
            current_host: "other".to_string(),
        }
    }

    fn kinds(h: &Host, v: &Vm, c: &PlacementConfig) -> Vec<&'static str> {
        check(h, v, c).iter().map(Reason::kind).collect()
    }

    #[test]
    fn a_fitting_host_passes() {
        assert!(check(&host(), &vm(), &PlacementConfig::default()).is_empty());
    }

    #[test]
    fn each_filter_on_its_own() {
        let c = PlacementConfig::default();
        let mut h = host();
        h.name = "other".into();
        assert_eq!(kinds(&h, &vm(), &c), ["current_host"]);

        let mut h = host();
        h.maintenance = true;
        assert_eq!(kinds(&h, &vm(), &c), ["maintenance"]);

        // 4096 + 1024 headroom: 5120 is just enough, 5119 is not.
        let mut h = host();
        h.memory_free_mib = 5120;
        assert!(kinds(&h, &vm(), &c).is_empty());
        h.memory_free_mib = 5119;
        assert_eq!(kinds(&h, &vm(), &c), ["memory"]);

        // 4 CPUs x 4 = 16: 14 + 2 fits, 15 + 2 does not.
        let mut h = host();
        h.vcpus_allocated = 14;
        assert!(kinds(&h, &vm(), &c).is_empty());
        h.vcpus_allocated = 15;
        assert_eq!(kinds(&h, &vm(), &c), ["vcpu_overcommit"]);

        let mut v = vm();
        v.required_cpu_features.insert("avx512f".into());
        v.required_cpu_features.insert("amx".into());
        assert_eq!(
            check(&host(), &v, &c),
            [Reason::CpuFeatures {
                missing: vec!["amx".into(), "avx512f".into()]
            }]
        );

        let mut h = host();
        h.labels.insert("group:web".into());
        assert_eq!(
            check(&h, &vm(), &c),
            [Reason::AntiAffinity {
                labels: vec!["group:web".into()]
            }]
        );
    }

    #[test]
    fn every_failed_filter_is_reported_in_order() {
        let c = PlacementConfig::default();
        let mut h = host();
        h.name = "other".into();
        h.maintenance = true;
        h.memory_free_mib = 0;
        h.vcpus_allocated = 100;
        h.cpu_features.clear();
        h.labels.insert("group:web".into());
        assert_eq!(
            kinds(&h, &vm(), &c),
            [
                "current_host",
                "maintenance",
                "memory",
                "vcpu_overcommit",
                "cpu_features",
                "anti_affinity"
            ]
        );
    }

    #[test]
    fn reasons_read_plainly() {
        let r = Reason::Memory {
            free_mib: 6144,
            vm_mib: 8192,
            headroom_mib: 1024,
        };
        assert_eq!(
            r.to_string(),
            "memory: needs 9216 MiB free (8192 MiB VM + 1024 MiB headroom), has 6144 MiB"
        );
    }
}
