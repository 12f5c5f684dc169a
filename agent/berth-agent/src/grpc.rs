//! The `grpc` probe: one `grpc.health.v1.Health/Check` call over HTTP/2
//! without TLS (prior knowledge, as the kubelet's prober), on the prober's
//! own thread and sockets
//! ([`crate::probe_io`] connects, writes [`request`] and feeds [`Reader`]).
//!
//! A maintained gRPC client (tonic) would bring hyper, h2 and tokio: a
//! second async runtime beside the agent's own, for one unary call. The call is
//! small enough to write from RFC 9113 (frames), RFC 7541 (the request's
//! headers, sent as literals, never Huffman-coded, so no table is kept)
//! and gRPC's wire format (a 5-byte prefix before the protobuf message).
//! The answer is read from the DATA frame: `status` (field 1) of
//! `HealthCheckResponse`, SERVING passes and anything else fails; a call
//! that ends without one (the server's error in its trailers, such as
//! UNIMPLEMENTED) fails the probe. The trailers are not decoded (that
//! would need HPACK's Huffman table and dynamic table), so a server that
//! sends a message and an error (grpcio answers an unknown service with an
//! empty message, UNKNOWN, and NOT_FOUND) is judged by the message: a
//! failure either way. `tests/grpc.rs` checks it against
//! grpcio's own health server.

use berth_plan::health::Outcome;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
/// Frames larger than the default maximum are refused.
const MAX_FRAME: usize = 16_384;
/// The `HealthCheckResponse` statuses, by number.
const STATUSES: [&str; 4] = ["UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"];

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK integer with an `n`-bit prefix whose high bits are `first`.
fn integer(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

fn string(out: &mut Vec<u8>, s: &str) {
    integer(out, 0, 7, s.len());
    out.extend_from_slice(s.as_bytes());
}

/// The request's header block: `:method POST` and `:scheme http` from the
/// static table, the rest as literals without indexing.
pub fn request_headers(authority: &str) -> Vec<u8> {
    let mut out = vec![0x83, 0x86];
    // Literal with the name from the static table: :path (4), :authority
    // (1), content-type (31), user-agent (58).
    for (index, value) in [
        (4, "/grpc.health.v1.Health/Check"),
        (1, authority),
        (31, "application/grpc"),
        (58, "kube-probe/1.35"),
    ] {
        integer(&mut out, 0, 4, index);
        string(&mut out, value);
    }
    out.push(0);
    string(&mut out, "te");
    string(&mut out, "trailers");
    out
}

/// The gRPC message for `HealthCheckRequest { service }`.
pub fn request_message(service: Option<&str>) -> Vec<u8> {
    let mut body = Vec::new();
    if let Some(s) = service.filter(|s| !s.is_empty()) {
        body.push(0x0a);
        let mut len = s.len();
        while len >= 0x80 {
            body.push((len as u8 & 0x7f) | 0x80);
            len >>= 7;
        }
        body.push(len as u8);
        body.extend_from_slice(s.as_bytes());
    }
    let mut out = vec![0];
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

fn varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(*at)?;
        *at += 1;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// `status` of a `HealthCheckResponse` message (0, UNKNOWN, when absent).
pub fn response_status(message: &[u8]) -> Option<u64> {
    let mut at = 0;
    let mut status = 0;
    while at < message.len() {
        let tag = varint(message, &mut at)?;
        match tag & 7 {
            0 => {
                let v = varint(message, &mut at)?;
                if tag >> 3 == 1 {
                    status = v;
                }
            }
            1 => at += 8,
            2 => {
                let len = varint(message, &mut at)? as usize;
                at = at.checked_add(len)?;
            }
            5 => at += 4,
            _ => return None,
        }
    }
    (at == message.len()).then_some(status)
}

/// Everything the client sends: the preface, its SETTINGS, the call's
/// headers and its one message.
pub fn request(authority: &str, service: Option<&str>) -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    out.extend(frame(HEADERS, END_HEADERS, 1, &request_headers(authority)));
    out.extend(frame(DATA, END_STREAM, 1, &request_message(service)));
    out
}

/// The probe's outcome from the call's answer: SERVING passes.
pub fn judge(answer: Result<u64, String>) -> Outcome {
    match answer {
        Ok(1) => Outcome::Success,
        Ok(status) => Outcome::Failure(format!(
            "service unhealthy (responded with {:?})",
            STATUSES.get(status as usize).copied().unwrap_or("?")
        )),
        Err(e) => Outcome::Failure(format!("error: health rpc probe failed: {e}")),
    }
}

/// Reads the server's frames as they arrive.
#[derive(Debug, Default)]
pub struct Reader {
    input: Vec<u8>,
    message: Vec<u8>,
}

impl Reader {
    /// Takes bytes read from the connection; answers the response's
    /// `status` once the call's message is whole (or why there is none).
    /// Acknowledgements the server is owed are appended to `reply`.
    pub fn feed(&mut self, data: &[u8], reply: &mut Vec<u8>) -> Option<Result<u64, String>> {
        self.input.extend_from_slice(data);
        let mut at = 0;
        let answer = loop {
            let Some(head) = self.input.get(at..at + 9) else {
                break None;
            };
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let (kind, flags) = (head[3], head[4]);
            let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            if len > MAX_FRAME {
                break Some(Err(format!("a frame of {len} bytes")));
            }
            let Some(payload) = self.input.get(at + 9..at + 9 + len) else {
                break None;
            };
            let payload = payload.to_vec();
            at += 9 + len;
            if let Some(answer) = self.frame(kind, flags, id, &payload, reply) {
                break Some(answer);
            }
        };
        self.input.drain(..at.min(self.input.len()));
        answer
    }

    fn frame(
        &mut self,
        kind: u8,
        flags: u8,
        id: u32,
        payload: &[u8],
        reply: &mut Vec<u8>,
    ) -> Option<Result<u64, String>> {
        match kind {
            SETTINGS if flags & ACK == 0 => reply.extend(frame(SETTINGS, ACK, 0, &[])),
            PING if flags & ACK == 0 => reply.extend(frame(PING, ACK, 0, payload)),
            GOAWAY => return Some(Err("the server sent GOAWAY".into())),
            RST_STREAM if id == 1 => {
                let code = payload
                    .get(..4)
                    .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                return Some(Err(format!(
                    "the server reset the call (error code {code})"
                )));
            }
            DATA if id == 1 => {
                let body = if flags & PADDED != 0 {
                    let pad = usize::from(*payload.first().unwrap_or(&0));
                    payload
                        .get(1..payload.len().saturating_sub(pad))
                        .unwrap_or(&[])
                } else {
                    payload
                };
                self.message.extend_from_slice(body);
                let message = &self.message;
                if message.len() >= 5 {
                    let want = u32::from_be_bytes([message[1], message[2], message[3], message[4]])
                        as usize;
                    if message[0] != 0 {
                        return Some(Err("a compressed response".into()));
                    }
                    if message.len() >= 5 + want {
                        return Some(
                            response_status(&message[5..5 + want])
                                .ok_or_else(|| "a malformed HealthCheckResponse".to_string()),
                        );
                    }
                }
            }
            HEADERS if id == 1 && flags & END_STREAM != 0 => {
                return Some(Err(
                    "the call ended without a response (the server's error is in its trailers: an unknown service, or no health service)"
                        .into(),
                ));
            }
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_headers_encode_as_the_specs_say() {
        assert_eq!(request_message(None), [0, 0, 0, 0, 0]);
        assert_eq!(
            request_message(Some("db")),
            [0, 0, 0, 0, 4, 0x0a, 2, b'd', b'b']
        );
        assert_eq!(response_status(&[0x08, 0x01]), Some(1));
        assert_eq!(response_status(&[]), Some(0));
        assert_eq!(response_status(&[0x08]), None);
        let h = request_headers("10.0.0.5:9000");
        assert_eq!(&h[..3], &[0x83, 0x86, 0x04]);
        // An integer past its prefix: 31 in 4 bits is 15, then 16.
        let mut out = Vec::new();
        integer(&mut out, 0, 4, 31);
        assert_eq!(out, [0x0f, 0x10]);
        assert_eq!(frame(SETTINGS, ACK, 0, &[]), [0, 0, 0, 4, 1, 0, 0, 0, 0]);
    }

    #[test]
    fn the_reader_takes_frames_in_any_pieces_and_acknowledges_settings() {
        let mut answer = frame(SETTINGS, 0, 0, &[]);
        answer.extend(frame(HEADERS, END_HEADERS, 1, &[0x88]));
        answer.extend(frame(DATA, 0, 1, &[0, 0, 0, 0, 2, 0x08, 0x02]));
        // Byte by byte: nothing is judged before the message is whole.
        let mut reader = Reader::default();
        let mut reply = Vec::new();
        let mut got = None;
        for (i, b) in answer.iter().enumerate() {
            got = reader.feed(&[*b], &mut reply);
            assert_eq!(got.is_some(), i == answer.len() - 1, "byte {i}");
        }
        assert_eq!(got, Some(Ok(2)));
        assert_eq!(reply, frame(SETTINGS, ACK, 0, &[]));
        assert_eq!(
            judge(Ok(2)),
            Outcome::Failure("service unhealthy (responded with \"NOT_SERVING\")".into())
        );
        // Trailers only: the call ended without a message.
        let mut reader = Reader::default();
        let end = frame(HEADERS, END_HEADERS | END_STREAM, 1, &[0x88]);
        assert!(matches!(reader.feed(&end, &mut reply), Some(Err(_))));
        let mut reader = Reader::default();
        let reset = frame(RST_STREAM, 0, 1, &[0, 0, 0, 8]);
        assert_eq!(
            reader.feed(&reset, &mut reply),
            Some(Err("the server reset the call (error code 8)".into()))
        );
    }
}
