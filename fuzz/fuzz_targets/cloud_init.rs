//! cloud-init NoCloud files from arbitrary bytes. The input is split on NUL
//! bytes into meta-data, user-data and network-config, so one input can
//! exercise all three and their merging; a missing `#cloud-config` header is
//! added half of the time so the YAML decoder is reached.
#![no_main]

use std::path::Path;

use basalt_init::nodeconfig::{self, CloudInitSources};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mut parts = rest
        .splitn(3, |&b| b == 0)
        .map(|p| String::from_utf8(p.to_vec()).ok());
    let meta = parts.next().flatten();
    let mut user = parts.next().flatten();
    let network = parts.next().flatten();
    if flags & 1 == 1 {
        user = user.map(|u| format!("#cloud-config\n{u}"));
    }
    let src = CloudInitSources {
        meta_data: meta.as_deref(),
        user_data: user.as_deref(),
        network_config: network.as_deref(),
    };
    if let Err(diags) = nodeconfig::parse_cloud_init(Path::new(""), &src) {
        for d in diags {
            assert!(d.line >= 1 && d.column >= 1, "{d}");
        }
    }
});
