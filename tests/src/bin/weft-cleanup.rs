//! weft-cleanup: deletes every lab namespace (`wft-*`) left by a killed run,
//! killing the processes inside it first. Never touches other namespaces.

fn main() {
    for name in weft_tests::cleanup_stale() {
        println!("deleted stale namespace {name}");
    }
}
