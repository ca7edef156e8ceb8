//! The stage protocol's binary frames (DESIGN §2), independent of any transport.
//!
//! Every frame is a fixed 32-byte header followed by a payload:
//!
//! ```text
//! magic "SSW1" | version u8 | kind u8 | flags u16 | session u64 | epoch u32 | seq u32 | payload_len u32 | reserved u32
//! ```
//!
//! All integers are little-endian. `payload_len` is checked against
//! [`limits::FRAME_PAYLOAD_BYTES_MAX`] before a byte of payload is read, and every count inside a
//! payload is checked against its own limit and against the bytes actually present before
//! anything is allocated. Decoding never panics: malformed input is a [`WireError`].

use crate::limits;

pub const MAGIC: [u8; 4] = *b"SSW1";
pub const VERSION: u8 = 1;
pub const HEADER_BYTES: usize = 32;

/// Element type of hidden-state payloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32 = 0,
    F16 = 1,
    Bf16 = 2,
}

impl Dtype {
    pub fn bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }

    fn from_u8(v: u8) -> Result<Dtype, WireError> {
        Ok(match v {
            0 => Dtype::F32,
            1 => Dtype::F16,
            2 => Dtype::Bf16,
            _ => return Err(WireError::Invalid { what: "dtype", value: v.into() }),
        })
    }
}

/// What a forward carries.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    Tokens(Vec<u32>),
    /// `rows × dim` values of `dtype`, row-major, raw little-endian bytes.
    Hidden {
        dtype: Dtype,
        rows: u32,
        dim: u32,
        data: Vec<u8>,
    },
}

/// Sampler settings of a session whose tail verifies drafts (DESIGN §3: the SpecExec rule runs
/// on the tail with the request's sampler and seed, so only token ids cross the network).
/// Ranges are checked by the stage that uses them, not by the decoder.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifySpec {
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub penalty_last_n: u32,
    pub seed: u64,
}

/// What a stage does with the rows of the previous speculative round before running this one.
#[derive(Clone, Debug, PartialEq)]
pub enum Commit {
    /// Keep every row (a causal chain accepted whole, or nothing pending).
    Keep,
    /// Keep this path of the last tree batch (batch indices, increasing, starting at 0).
    Path(Vec<u32>),
    /// Drop every row after this many tokens (a rejected chain, or a pipeline rollback).
    Len(u32),
}

/// The speculative part of a `Forward`: the batch's token ids (carried stage to stage so the
/// tail knows the session's tokens) and the commit of the previous round. With `verify` the batch
/// is `[root, draft nodes…]` and the tail answers with a [`Message::Verdict`]; without, it is a
/// plain causal batch (a prefill or a replay) and the tail answers as for any forward.
#[derive(Clone, Debug, PartialEq)]
pub struct SpecRound {
    pub tokens: Vec<u32>,
    pub commit: Commit,
    pub verify: bool,
}

/// One protocol message.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// Reserve KV for a session on layers `[start, end)` of the model whose GGUF hashes to `model_id`.
    /// `next_hop`: where this stage sends its output (the next stage's address); `None` sends it
    /// back to whoever opened the session (the client: the tail of a ring, or every stage of a
    /// client-driven ring). `tail_argmax`: the tail answers with the argmax token id of each
    /// output row instead of the logits (a few bytes instead of a vocabulary of floats).
    Open {
        model_id: [u8; 32],
        start: u32,
        end: u32,
        max_tokens: u32,
        next_hop: Option<String>,
        tail_argmax: bool,
        /// The tail verifies speculative rounds with these sampler settings.
        verify: Option<VerifySpec>,
    },
    /// Run the stage. `positions` are explicit; `tree_parents` is present for a tree batch;
    /// `spec` is present for a speculative round verified at the tail.
    Forward {
        positions: Vec<u32>,
        tree_parents: Option<Vec<i32>>,
        input: Input,
        spec: Option<SpecRound>,
    },
    /// Keep one path of the last tree batch (batch indices, increasing).
    Accept {
        path: Vec<u32>,
    },
    /// Drop everything after `len` committed tokens.
    Truncate {
        len: u32,
    },
    Close,
    /// Success of an `Open`, `Accept`, `Truncate` or `Close`; `committed` is the session's
    /// committed token count afterwards.
    Ack {
        committed: u32,
    },
    /// Hidden states or logits going back.
    Output {
        input: Input,
    },
    /// A refusal with a stable code.
    Error {
        code: ErrorCode,
        message: String,
    },
    /// The tail's verdict on a speculative round: the accepted draft nodes (indices into the
    /// round's draft, root excluded, a root-to-node path) and the target's own next token.
    Verdict {
        accepted: Vec<u32>,
        next: u32,
    },
}

/// Stable error codes sent to callers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorCode {
    Malformed = 1,
    UnknownSession = 2,
    StaleEpoch = 3,
    PositionMismatch = 4,
    Capacity = 5,
    WrongModel = 6,
    Internal = 7,
}

impl ErrorCode {
    fn from_u16(v: u16) -> Result<ErrorCode, WireError> {
        Ok(match v {
            1 => ErrorCode::Malformed,
            2 => ErrorCode::UnknownSession,
            3 => ErrorCode::StaleEpoch,
            4 => ErrorCode::PositionMismatch,
            5 => ErrorCode::Capacity,
            6 => ErrorCode::WrongModel,
            7 => ErrorCode::Internal,
            _ => return Err(WireError::Invalid { what: "error code", value: v.into() }),
        })
    }
}

/// A frame: routing header fields plus the message.
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    pub session: u64,
    pub epoch: u32,
    pub seq: u32,
    pub message: Message,
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    /// Fewer bytes than the header or payload needs.
    Truncated {
        needed: usize,
        got: usize,
    },
    BadMagic,
    UnsupportedVersion(u8),
    /// A declared length or count over its limit.
    TooLarge {
        what: &'static str,
        value: u64,
        max: u64,
    },
    Invalid {
        what: &'static str,
        value: u64,
    },
    /// Bytes left over after the payload was decoded.
    TrailingBytes(usize),
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Truncated { needed, got } => write!(f, "truncated frame: needed {needed} bytes, got {got}"),
            WireError::BadMagic => write!(f, "not a specswarm frame (bad magic)"),
            WireError::UnsupportedVersion(v) => write!(f, "unsupported protocol version {v}"),
            WireError::TooLarge { what, value, max } => write!(f, "{what} of {value} exceeds the limit of {max}"),
            WireError::Invalid { what, value } => write!(f, "invalid {what}: {value}"),
            WireError::TrailingBytes(n) => write!(f, "{n} unexpected bytes after the payload"),
        }
    }
}

impl std::error::Error for WireError {}

const KIND_OPEN: u8 = 1;
const KIND_FORWARD: u8 = 2;
const KIND_ACCEPT: u8 = 3;
const KIND_TRUNCATE: u8 = 4;
const KIND_CLOSE: u8 = 5;
const KIND_OUTPUT: u8 = 6;
const KIND_ERROR: u8 = 7;
const KIND_ACK: u8 = 8;
const KIND_VERDICT: u8 = 9;

const INPUT_TOKENS: u8 = 0;
const INPUT_HIDDEN: u8 = 1;

impl Frame {
    /// Serialize to one contiguous buffer (header + payload).
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::new();
        let kind = match &self.message {
            Message::Open { model_id, start, end, max_tokens, next_hop, tail_argmax, verify } => {
                p.extend_from_slice(model_id);
                for v in [start, end, max_tokens] {
                    p.extend_from_slice(&v.to_le_bytes());
                }
                let hop = next_hop.as_deref().unwrap_or("").as_bytes();
                let hop = &hop[..hop.len().min(limits::NEXT_HOP_BYTES_MAX)];
                put_u32(&mut p, hop.len() as u32);
                p.extend_from_slice(hop);
                p.push(u8::from(*tail_argmax));
                match verify {
                    None => p.push(0),
                    Some(v) => {
                        p.push(1);
                        for f in [v.temperature, v.top_p, v.min_p, v.repetition_penalty] {
                            p.extend_from_slice(&f.to_le_bytes());
                        }
                        for f in [v.frequency_penalty, v.presence_penalty] {
                            p.extend_from_slice(&f.to_le_bytes());
                        }
                        put_u32(&mut p, v.top_k);
                        put_u32(&mut p, v.penalty_last_n);
                        p.extend_from_slice(&v.seed.to_le_bytes());
                    }
                }
                KIND_OPEN
            }
            Message::Forward { positions, tree_parents, input, spec } => {
                put_u32s(&mut p, positions);
                match tree_parents {
                    None => p.push(0),
                    Some(tp) => {
                        p.push(1);
                        put_u32(&mut p, tp.len() as u32);
                        tp.iter().for_each(|v| p.extend_from_slice(&v.to_le_bytes()));
                    }
                }
                put_input(&mut p, input);
                match spec {
                    None => p.push(0),
                    Some(r) => {
                        p.push(1);
                        put_u32s(&mut p, &r.tokens);
                        match &r.commit {
                            Commit::Keep => p.push(0),
                            Commit::Path(path) => {
                                p.push(1);
                                put_u32s(&mut p, path);
                            }
                            Commit::Len(len) => {
                                p.push(2);
                                put_u32(&mut p, *len);
                            }
                        }
                        p.push(u8::from(r.verify));
                    }
                }
                KIND_FORWARD
            }
            Message::Accept { path } => {
                put_u32s(&mut p, path);
                KIND_ACCEPT
            }
            Message::Truncate { len } => {
                put_u32(&mut p, *len);
                KIND_TRUNCATE
            }
            Message::Close => KIND_CLOSE,
            Message::Ack { committed } => {
                put_u32(&mut p, *committed);
                KIND_ACK
            }
            Message::Output { input } => {
                put_input(&mut p, input);
                KIND_OUTPUT
            }
            Message::Error { code, message } => {
                p.extend_from_slice(&(*code as u16).to_le_bytes());
                let m = &message.as_bytes()[..message.len().min(limits::ERROR_MESSAGE_BYTES_MAX)];
                put_u32(&mut p, m.len() as u32);
                p.extend_from_slice(m);
                KIND_ERROR
            }
            Message::Verdict { accepted, next } => {
                put_u32s(&mut p, accepted);
                put_u32(&mut p, *next);
                KIND_VERDICT
            }
        };
        let mut out = Vec::with_capacity(HEADER_BYTES + p.len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(kind);
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.session.to_le_bytes());
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&p);
        out
    }

    /// Read the header; returns (kind, session, epoch, seq, payload_len) after checking magic,
    /// version and the payload limit. Use it to know how many bytes to read from a stream.
    pub fn decode_header(b: &[u8]) -> Result<(u8, u64, u32, u32, usize), WireError> {
        if b.len() < HEADER_BYTES {
            return Err(WireError::Truncated { needed: HEADER_BYTES, got: b.len() });
        }
        if b[0..4] != MAGIC {
            return Err(WireError::BadMagic);
        }
        if b[4] != VERSION {
            return Err(WireError::UnsupportedVersion(b[4]));
        }
        let session = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
        let epoch = u32::from_le_bytes(b[16..20].try_into().expect("4 bytes"));
        let seq = u32::from_le_bytes(b[20..24].try_into().expect("4 bytes"));
        let len = u32::from_le_bytes(b[24..28].try_into().expect("4 bytes")) as usize;
        if len > limits::FRAME_PAYLOAD_BYTES_MAX {
            return Err(WireError::TooLarge {
                what: "frame payload",
                value: len as u64,
                max: limits::FRAME_PAYLOAD_BYTES_MAX as u64,
            });
        }
        Ok((b[5], session, epoch, seq, len))
    }

    /// Decode one whole frame (exactly `HEADER_BYTES + payload_len` bytes).
    pub fn decode(b: &[u8]) -> Result<Frame, WireError> {
        let (kind, session, epoch, seq, len) = Frame::decode_header(b)?;
        let need = HEADER_BYTES + len;
        if b.len() < need {
            return Err(WireError::Truncated { needed: need, got: b.len() });
        }
        if b.len() > need {
            return Err(WireError::TrailingBytes(b.len() - need));
        }
        let mut r = Reader { b: &b[HEADER_BYTES..], at: 0 };
        let message = match kind {
            KIND_OPEN => {
                let model_id: [u8; 32] = r.take(32)?.try_into().expect("32 bytes");
                let (start, end, max_tokens) = (r.u32()?, r.u32()?, r.u32()?);
                if start >= end {
                    return Err(WireError::Invalid { what: "layer range end", value: end.into() });
                }
                if max_tokens as usize > limits::KV_TOKENS_PER_SESSION_MAX {
                    return Err(WireError::TooLarge {
                        what: "session KV tokens",
                        value: max_tokens.into(),
                        max: limits::KV_TOKENS_PER_SESSION_MAX as u64,
                    });
                }
                let n = r.count("next hop", limits::NEXT_HOP_BYTES_MAX, 1)?;
                let hop = std::str::from_utf8(r.take(n)?)
                    .map_err(|_| WireError::Invalid { what: "next hop", value: n as u64 })?;
                let next_hop = (!hop.is_empty()).then(|| hop.to_string());
                let tail_argmax = match r.u8()? {
                    0 => false,
                    1 => true,
                    x => return Err(WireError::Invalid { what: "tail_argmax flag", value: x.into() }),
                };
                let verify = match r.u8()? {
                    0 => None,
                    1 => {
                        let mut f = [0f32; 6];
                        for v in &mut f {
                            *v = f32::from_bits(r.u32()?);
                        }
                        let (top_k, penalty_last_n) = (r.u32()?, r.u32()?);
                        let seed = u64::from(r.u32()?) | (u64::from(r.u32()?) << 32);
                        Some(VerifySpec {
                            temperature: f[0],
                            top_p: f[1],
                            min_p: f[2],
                            repetition_penalty: f[3],
                            frequency_penalty: f[4],
                            presence_penalty: f[5],
                            top_k,
                            penalty_last_n,
                            seed,
                        })
                    }
                    x => return Err(WireError::Invalid { what: "verify flag", value: x.into() }),
                };
                Message::Open { model_id, start, end, max_tokens, next_hop, tail_argmax, verify }
            }
            KIND_FORWARD => {
                let positions = r.u32s("positions", limits::FORWARD_BATCH_TOKENS_MAX)?;
                let tree_parents = match r.u8()? {
                    0 => None,
                    1 => {
                        let n = r.count("tree parents", limits::FORWARD_BATCH_TOKENS_MAX, 4)?;
                        let mut v = Vec::with_capacity(n);
                        for _ in 0..n {
                            v.push(r.u32()? as i32);
                        }
                        Some(v)
                    }
                    x => return Err(WireError::Invalid { what: "tree flag", value: x.into() }),
                };
                let input = r.input()?;
                let spec = match r.u8()? {
                    0 => None,
                    1 => {
                        let tokens = r.u32s("round tokens", limits::FORWARD_BATCH_TOKENS_MAX)?;
                        let commit = match r.u8()? {
                            0 => Commit::Keep,
                            1 => Commit::Path(r.u32s("commit path", limits::FORWARD_BATCH_TOKENS_MAX)?),
                            2 => Commit::Len(r.u32()?),
                            x => return Err(WireError::Invalid { what: "commit kind", value: x.into() }),
                        };
                        let verify = match r.u8()? {
                            0 => false,
                            1 => true,
                            x => return Err(WireError::Invalid { what: "verify flag", value: x.into() }),
                        };
                        Some(SpecRound { tokens, commit, verify })
                    }
                    x => return Err(WireError::Invalid { what: "spec flag", value: x.into() }),
                };
                Message::Forward { positions, tree_parents, input, spec }
            }
            KIND_ACCEPT => Message::Accept { path: r.u32s("path", limits::FORWARD_BATCH_TOKENS_MAX)? },
            KIND_TRUNCATE => Message::Truncate { len: r.u32()? },
            KIND_CLOSE => Message::Close,
            KIND_ACK => Message::Ack { committed: r.u32()? },
            KIND_OUTPUT => Message::Output { input: r.input()? },
            KIND_ERROR => {
                let code = ErrorCode::from_u16(u16::from_le_bytes([r.u8()?, r.u8()?]))?;
                let n = r.count("error message", limits::ERROR_MESSAGE_BYTES_MAX, 1)?;
                let message = String::from_utf8_lossy(r.take(n)?).into_owned();
                Message::Error { code, message }
            }
            KIND_VERDICT => {
                let accepted = r.u32s("accepted nodes", limits::FORWARD_BATCH_TOKENS_MAX)?;
                Message::Verdict { accepted, next: r.u32()? }
            }
            k => return Err(WireError::Invalid { what: "frame kind", value: k.into() }),
        };
        if r.at != r.b.len() {
            return Err(WireError::TrailingBytes(r.b.len() - r.at));
        }
        Ok(Frame { session, epoch, seq, message })
    }
}

fn put_u32(p: &mut Vec<u8>, v: u32) {
    p.extend_from_slice(&v.to_le_bytes());
}

fn put_u32s(p: &mut Vec<u8>, v: &[u32]) {
    put_u32(p, v.len() as u32);
    v.iter().for_each(|x| p.extend_from_slice(&x.to_le_bytes()));
}

fn put_input(p: &mut Vec<u8>, input: &Input) {
    match input {
        Input::Tokens(t) => {
            p.push(INPUT_TOKENS);
            put_u32s(p, t);
        }
        Input::Hidden { dtype, rows, dim, data } => {
            p.push(INPUT_HIDDEN);
            p.push(*dtype as u8);
            put_u32(p, *rows);
            put_u32(p, *dim);
            p.extend_from_slice(data);
        }
    }
}

/// A bounds-checked cursor over a payload.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len()).ok_or(WireError::Truncated {
            needed: HEADER_BYTES + self.at.saturating_add(n),
            got: HEADER_BYTES + self.b.len(),
        })?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    /// A count, checked against `max` and against the bytes left (`elem` bytes each).
    fn count(&mut self, what: &'static str, max: usize, elem: usize) -> Result<usize, WireError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(WireError::TooLarge { what, value: n as u64, max: max as u64 });
        }
        let left = self.b.len() - self.at;
        if n.saturating_mul(elem) > left {
            return Err(WireError::Truncated {
                needed: HEADER_BYTES + self.at + n * elem,
                got: HEADER_BYTES + self.b.len(),
            });
        }
        Ok(n)
    }

    fn u32s(&mut self, what: &'static str, max: usize) -> Result<Vec<u32>, WireError> {
        let n = self.count(what, max, 4)?;
        let raw = self.take(n * 4)?;
        Ok(raw.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))).collect())
    }

    fn input(&mut self) -> Result<Input, WireError> {
        match self.u8()? {
            INPUT_TOKENS => Ok(Input::Tokens(self.u32s("tokens", limits::FORWARD_BATCH_TOKENS_MAX)?)),
            INPUT_HIDDEN => {
                let dtype = Dtype::from_u8(self.u8()?)?;
                let (rows, dim) = (self.u32()?, self.u32()?);
                if rows as usize > limits::FORWARD_BATCH_TOKENS_MAX {
                    return Err(WireError::TooLarge {
                        what: "hidden rows",
                        value: rows.into(),
                        max: limits::FORWARD_BATCH_TOKENS_MAX as u64,
                    });
                }
                if dim as usize > limits::ROW_VALUES_MAX {
                    return Err(WireError::TooLarge {
                        what: "hidden dim",
                        value: dim.into(),
                        max: limits::ROW_VALUES_MAX as u64,
                    });
                }
                let bytes = rows as usize * dim as usize * dtype.bytes();
                let data = self.take(bytes)?.to_vec();
                Ok(Input::Hidden { dtype, rows, dim, data })
            }
            x => Err(WireError::Invalid { what: "input kind", value: x.into() }),
        }
    }
}
