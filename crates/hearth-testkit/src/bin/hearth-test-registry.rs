//! A local `docker-registry` holding the tests' stand-in for
//! `library/ubuntu:20.04` (busybox), for benchmarks run from scripts:
//! prints the registry's host:port once the image is pushed, and stops the
//! registry when its standard input closes.

use std::io::Read;

fn main() {
    let registry = hearth_testkit::Registry::start("");
    tokio::runtime::Runtime::new()
        .expect("tokio runtime")
        .block_on(hearth_testkit::push_busybox_image(
            &registry.host,
            "library/ubuntu",
            "20.04",
            &[],
        ));
    println!("{}", registry.host);
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(registry);
}
