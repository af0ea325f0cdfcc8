//! Application codes of QUIC connection closes and stream resets, one enum
//! each, so the relay and its clients agree on what a close means.

/// An enum of wire codes with `code()` and `from_code()`.
macro_rules! wire_codes {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $v:ident = $n:expr,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u32)]
        pub enum $name {
            $($(#[$vmeta])* $v = $n,)+
        }

        impl $name {
            /// Every code.
            pub const ALL: &'static [$name] = &[$($name::$v,)+];

            /// The code on the wire.
            pub const fn code(self) -> u32 {
                self as u32
            }

            /// The value for a received code, if it is one of ours.
            pub fn from_code(code: u64) -> Option<$name> {
                $name::ALL.iter().copied().find(|c| u64::from(c.code()) == code)
            }
        }
    };
}

wire_codes! {
    /// Why a peer closed the whole QUIC connection.
    CloseCode {
        /// An orderly close (client going away, worker shutting down).
        Normal = 0,
        /// The relay is shutting down or restarting: reconnect promptly.
        Restarting = 0x10,
        /// The node was revoked: do not reconnect with this identity.
        Revoked = 0x11,
        /// The same node connected again elsewhere: this session is superseded.
        Replaced = 0x12,
        /// Admission was refused (the reason travels in Noise message 2).
        Rejected = 0x13,
        /// The relay is leaving its fleet (stopped by its operator): move to
        /// another relay of the fleet now, not back to this one.
        Draining = 0x14,
    }
}

wire_codes! {
    /// Why a peer reset (or stopped) one stream.
    ResetCode {
        /// The stream or its connection already ended.
        Ended = 0,
        /// The other half of a spliced tunnel failed, or the stream was refused.
        Failed = 1,
        /// The peer sent something that is not a valid message for this stream.
        Protocol = 2,
        /// The peer read too slowly (a control session's queue filled): reconnect and resync.
        Slow = 3,
        /// A newer session of the node took over, or it left the mesh.
        Superseded = 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_roundtrip_and_are_distinct() {
        for c in CloseCode::ALL {
            assert_eq!(CloseCode::from_code(u64::from(c.code())), Some(*c));
        }
        for c in ResetCode::ALL {
            assert_eq!(ResetCode::from_code(u64::from(c.code())), Some(*c));
        }
        assert_eq!(CloseCode::from_code(7), None);
        assert_eq!(ResetCode::from_code(99), None);
    }
}
