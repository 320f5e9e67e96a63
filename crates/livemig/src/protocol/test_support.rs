//! Fixtures the protocol's unit tests share.

use crate::memory::{MemoryLayout, RegionDesc};

/// Two regions: low memory below 640 KiB and 64 MiB from 1 MiB.
pub(crate) fn layout() -> MemoryLayout {
    MemoryLayout::new(vec![
        RegionDesc {
            guest_addr: 0,
            size: 0xa0000,
        },
        RegionDesc {
            guest_addr: 0x100000,
            size: 64 << 20,
        },
    ])
    .unwrap()
}
