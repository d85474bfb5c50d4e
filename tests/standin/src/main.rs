//! `k8s-standin`: a STAND-IN for k3s/k0s, used only in tests. See docs/standin.md.

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    std::process::exit(k8s_standin::run(argv));
}
