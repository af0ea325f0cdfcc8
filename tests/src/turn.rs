//! Turns for the tests of one test binary whose files used to be binaries of their own
//! (`tests/tests/lab/`, `tunnel-relay/tests/relay/`): the tests of one group (a file) may
//! run together, tests of different groups one after the other, as when each file was a
//! binary and cargo ran the binaries one at a time (they time failovers and traffic gaps,
//! and two scenarios on two vCPUs starve each other's nodes).

use std::sync::{Condvar, Mutex};

/// The group running now and how many of its tests.
static TURN: Mutex<(String, usize)> = Mutex::new((String::new(), 0));
static FREE: Condvar = Condvar::new();

/// Held while a test runs ([`take`]).
pub struct Turn(());

/// Waits until no test of another group runs, then holds a turn for `group` (a file's
/// `module_path!()`; a file whose tests must not overlap gives each test its own group).
pub fn take(group: &str) -> Turn {
    let mut st = TURN.lock().unwrap_or_else(|e| e.into_inner());
    while st.1 > 0 && st.0 != group {
        st = FREE.wait(st).unwrap_or_else(|e| e.into_inner());
    }
    st.0 = group.to_string();
    st.1 += 1;
    Turn(())
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut st = TURN.lock().unwrap_or_else(|e| e.into_inner());
        st.1 -= 1;
        if st.1 == 0 {
            FREE.notify_all();
        }
    }
}
