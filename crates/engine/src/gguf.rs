//! A bounded GGUF reader (and a small writer for tests and tooling).
//!
//! The reader parses the header, the metadata and the tensor directory, and checks every length
//! against [`specswarm_proto::limits`] *before* allocating, and every tensor's byte range against the
//! file's size. Tensor data is read lazily, one tensor at a time, so a layer slice loads only the
//! tensors it needs.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use specswarm_kernels::{GgmlType, QMatrix};
use specswarm_proto::limits;

use crate::error::EngineError;

const GGUF_MAGIC: [u8; 4] = *b"GGUF";
const ALIGNMENT_DEFAULT: u64 = 32;

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            MetaValue::Bool(v) => Some(v.into()),
            _ => None,
        }
    }

    /// The value as a float, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the innermost (contiguous) dimension, i.e. the number of columns.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte offset in the file.
    pub offset: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file: metadata and tensor directory, with tensor data read on demand.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    file_len: u64,
}

fn corrupt(path: &Path, what: impl Into<String>) -> EngineError {
    EngineError::CorruptModel { path: path.to_path_buf(), reason: what.into() }
}

/// A reader that counts its position and turns EOF into a "truncated" error.
struct Cursor<R> {
    inner: R,
    pos: u64,
}

impl<R: Read> Cursor<R> {
    fn bytes<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        let mut b = [0u8; N];
        self.inner.read_exact(&mut b)?;
        self.pos += N as u64;
        Ok(b)
    }
    fn u8(&mut self) -> io::Result<u8> {
        Ok(self.bytes::<1>()?[0])
    }
    fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
    fn vec(&mut self, n: u64) -> io::Result<Vec<u8>> {
        let mut v = Vec::new();
        (&mut self.inner).take(n).read_to_end(&mut v)?;
        if v.len() as u64 != n {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "truncated"));
        }
        self.pos += n;
        Ok(v)
    }
}

impl GgufFile {
    /// Parse the header, metadata and tensor directory of `path`.
    pub fn open(path: &Path) -> Result<GgufFile, EngineError> {
        let file = File::open(path).map_err(|e| EngineError::Io { path: path.to_path_buf(), source: e })?;
        let file_len = file.metadata().map_err(|e| EngineError::Io { path: path.to_path_buf(), source: e })?.len();
        let mut cur = Cursor { inner: BufReader::with_capacity(1 << 16, file), pos: 0 };
        Self::parse(path, &mut cur, file_len).map_err(|e| match e {
            ParseError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                corrupt(path, format!("file is truncated (ends at byte {file_len} inside the header)"))
            }
            ParseError::Io(e) => EngineError::Io { path: path.to_path_buf(), source: e },
            ParseError::Engine(e) => e,
        })
    }

    fn parse<R: Read>(path: &Path, cur: &mut Cursor<R>, file_len: u64) -> Result<GgufFile, ParseError> {
        let magic = cur.bytes::<4>()?;
        if magic != GGUF_MAGIC {
            return Err(corrupt(path, format!("not a GGUF file (magic {magic:02x?}, expected \"GGUF\")")).into());
        }
        let version = cur.u32()?;
        if !(2..=3).contains(&version) {
            return Err(corrupt(path, format!("unsupported GGUF version {version} (supported: 2, 3)")).into());
        }
        let n_tensors = cur.u64()?;
        let n_kv = cur.u64()?;
        if n_tensors > limits::GGUF_TENSORS_MAX {
            return Err(corrupt(path, format!("tensor count {n_tensors} exceeds {}", limits::GGUF_TENSORS_MAX)).into());
        }
        if n_kv > limits::GGUF_METADATA_ENTRIES_MAX {
            return Err(
                corrupt(path, format!("metadata count {n_kv} exceeds {}", limits::GGUF_METADATA_ENTRIES_MAX)).into()
            );
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = read_string(path, cur)?;
            let ty = cur.u32()?;
            let value = read_value(path, cur, ty, 0)?;
            metadata.insert(key, value);
        }
        let alignment = match metadata.get("general.alignment") {
            None => ALIGNMENT_DEFAULT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 20 => a,
                _ => return Err(corrupt(path, format!("bad general.alignment {v:?}")).into()),
            },
        };
        let mut raw = Vec::with_capacity(n_tensors.min(4096) as usize);
        for _ in 0..n_tensors {
            let name = read_string(path, cur)?;
            let n_dims = cur.u32()?;
            if n_dims == 0 || n_dims > limits::GGUF_TENSOR_DIMS_MAX {
                return Err(corrupt(path, format!("tensor {name:?} has {n_dims} dimensions")).into());
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(cur.u64()?);
            }
            let ty_id = cur.u32()?;
            let ty = GgmlType::from_u32(ty_id)
                .ok_or_else(|| corrupt(path, format!("tensor {name:?} has unknown or unsupported type id {ty_id}")))?;
            let offset = cur.u64()?;
            raw.push((name, dims, ty, offset));
        }
        let data_start = cur.pos.div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(raw.len());
        let mut index = HashMap::with_capacity(raw.len());
        for (name, dims, ty, rel) in raw {
            let n_elems = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
            let n_bytes = n_elems
                .and_then(|n| usize::try_from(n).ok())
                .and_then(|n| {
                    let cols = usize::try_from(dims[0]).ok()?;
                    let rows = n.checked_div(cols).unwrap_or(0);
                    ty.row_bytes(cols)?.checked_mul(rows)
                })
                .map(|b| b as u64)
                .ok_or_else(|| {
                    corrupt(path, format!("tensor {name:?} has invalid shape {dims:?} for {}", ty.name()))
                })?;
            if n_bytes > limits::GGUF_TENSOR_BYTES_MAX {
                return Err(corrupt(path, format!("tensor {name:?} is {n_bytes} bytes, over the limit")).into());
            }
            let offset = data_start
                .checked_add(rel)
                .filter(|o| o.checked_add(n_bytes).is_some_and(|end| end <= file_len))
                .ok_or_else(|| {
                    corrupt(
                        path,
                        format!(
                            "tensor {name:?} ({n_bytes} bytes at data offset {rel}) lies outside the file \
                             ({file_len} bytes): the file is truncated or corrupt"
                        ),
                    )
                })?;
            if index.insert(name.clone(), tensors.len()).is_some() {
                return Err(corrupt(path, format!("duplicate tensor name {name:?}")).into());
            }
            tensors.push(TensorInfo { name, dims, ty, offset, n_bytes });
        }
        Ok(GgufFile { path: path.to_path_buf(), version, metadata, tensors, index, file_len })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(MetaValue::as_str)
    }

    pub fn require_u64(&self, key: &str) -> Result<u64, EngineError> {
        self.get(key).and_then(MetaValue::as_u64).ok_or_else(|| EngineError::MissingMetadata { key: key.to_string() })
    }

    pub fn require_f64(&self, key: &str) -> Result<f64, EngineError> {
        self.get(key).and_then(MetaValue::as_f64).ok_or_else(|| EngineError::MissingMetadata { key: key.to_string() })
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// Read one tensor's raw bytes.
    pub fn read_tensor_bytes(&self, info: &TensorInfo) -> Result<Vec<u8>, EngineError> {
        let io_err = |e| EngineError::Io { path: self.path.clone(), source: e };
        let mut f = File::open(&self.path).map_err(io_err)?;
        f.seek(SeekFrom::Start(info.offset)).map_err(io_err)?;
        let mut buf = vec![0u8; info.n_bytes as usize];
        f.read_exact(&mut buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                corrupt(&self.path, format!("tensor {:?} is cut off: the file is truncated", info.name))
            } else {
                io_err(e)
            }
        })?;
        Ok(buf)
    }

    fn require_tensor(&self, name: &str) -> Result<&TensorInfo, EngineError> {
        self.tensor_info(name).ok_or_else(|| EngineError::MissingTensor { name: name.to_string() })
    }

    /// Load a 2-D tensor as a matrix with `rows` rows of `cols` elements, checking the shape.
    pub fn load_matrix(&self, name: &str, rows: usize, cols: usize) -> Result<QMatrix, EngineError> {
        let info = self.require_tensor(name)?;
        let expected = vec![cols as u64, rows as u64];
        if info.dims != expected {
            return Err(EngineError::ShapeMismatch { tensor: name.to_string(), expected, got: info.dims.clone() });
        }
        let bytes = self.read_tensor_bytes(info)?;
        QMatrix::new(info.ty, rows, cols, bytes).map_err(|e| corrupt(&self.path, format!("tensor {name:?}: {e}")))
    }

    /// Load a 1-D tensor of `len` elements as f32 (any type; dequantized).
    pub fn load_vector(&self, name: &str, len: usize) -> Result<Vec<f32>, EngineError> {
        let info = self.require_tensor(name)?;
        if info.dims != [len as u64] {
            return Err(EngineError::ShapeMismatch {
                tensor: name.to_string(),
                expected: vec![len as u64],
                got: info.dims.clone(),
            });
        }
        let bytes = self.read_tensor_bytes(info)?;
        let mut out = vec![0f32; len];
        specswarm_kernels::dequantize_row(info.ty, &bytes, &mut out)
            .map_err(|e| corrupt(&self.path, format!("tensor {name:?}: {e}")))?;
        Ok(out)
    }
}

enum ParseError {
    Io(io::Error),
    Engine(EngineError),
}

impl From<io::Error> for ParseError {
    fn from(e: io::Error) -> Self {
        ParseError::Io(e)
    }
}

impl From<EngineError> for ParseError {
    fn from(e: EngineError) -> Self {
        ParseError::Engine(e)
    }
}

fn read_string<R: Read>(path: &Path, cur: &mut Cursor<R>) -> Result<String, ParseError> {
    let len = cur.u64()?;
    if len > limits::GGUF_STRING_BYTES_MAX {
        return Err(corrupt(path, format!("string of {len} bytes at offset {} exceeds the limit", cur.pos)).into());
    }
    let bytes = cur.vec(len)?;
    // Some vocabularies carry invalid UTF-8 in byte tokens; keep them losslessly readable.
    Ok(String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

fn read_value<R: Read>(path: &Path, cur: &mut Cursor<R>, ty: u32, depth: u32) -> Result<MetaValue, ParseError> {
    Ok(match ty {
        0 => MetaValue::U8(cur.u8()?),
        1 => MetaValue::I8(cur.u8()? as i8),
        2 => MetaValue::U16(u16::from_le_bytes(cur.bytes()?)),
        3 => MetaValue::I16(i16::from_le_bytes(cur.bytes()?)),
        4 => MetaValue::U32(cur.u32()?),
        5 => MetaValue::I32(i32::from_le_bytes(cur.bytes()?)),
        6 => MetaValue::F32(f32::from_le_bytes(cur.bytes()?)),
        7 => MetaValue::Bool(cur.u8()? != 0),
        8 => MetaValue::String(read_string(path, cur)?),
        9 => {
            if depth > 2 {
                return Err(corrupt(path, "metadata arrays nested too deeply").into());
            }
            let elem_ty = cur.u32()?;
            let n = cur.u64()?;
            if n > limits::GGUF_ARRAY_ELEMENTS_MAX {
                return Err(corrupt(path, format!("metadata array of {n} elements exceeds the limit")).into());
            }
            let mut items = Vec::with_capacity((n as usize).min(1 << 16));
            for _ in 0..n {
                items.push(read_value(path, cur, elem_ty, depth + 1)?);
            }
            MetaValue::Array(items)
        }
        10 => MetaValue::U64(cur.u64()?),
        11 => MetaValue::I64(i64::from_le_bytes(cur.bytes()?)),
        12 => MetaValue::F64(f64::from_le_bytes(cur.bytes()?)),
        other => return Err(corrupt(path, format!("unknown metadata value type {other}")).into()),
    })
}

/// Writes GGUF v3 files: used by tests (tiny random models, corrupt files) and tooling.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn meta(&mut self, key: &str, value: MetaValue) -> &mut Self {
        self.metadata.push((key.to_string(), value));
        self
    }

    /// Add a tensor; `dims` in ggml order (innermost first).
    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> &mut Self {
        self.tensors.push((name.to_string(), dims.to_vec(), ty, data));
        self
    }

    pub fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        let mut header = Vec::new();
        header.extend_from_slice(&GGUF_MAGIC);
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            write_str(&mut header, k);
            header.extend_from_slice(&value_type(v).to_le_bytes());
            write_value(&mut header, v);
        }
        let mut rel = 0u64;
        let mut offsets = Vec::new();
        for (name, dims, ty, data) in &self.tensors {
            write_str(&mut header, name);
            header.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                header.extend_from_slice(&d.to_le_bytes());
            }
            header.extend_from_slice(&ggml_type_id(*ty).to_le_bytes());
            header.extend_from_slice(&rel.to_le_bytes());
            offsets.push(rel);
            rel = (rel + data.len() as u64).div_ceil(ALIGNMENT_DEFAULT) * ALIGNMENT_DEFAULT;
        }
        let pad = header.len().div_ceil(ALIGNMENT_DEFAULT as usize) * ALIGNMENT_DEFAULT as usize - header.len();
        header.extend(std::iter::repeat_n(0u8, pad));
        out.write_all(&header)?;
        let mut written = 0u64;
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            out.write_all(&vec![0u8; (off - written) as usize])?;
            out.write_all(data)?;
            written = off + data.len() as u64;
        }
        Ok(())
    }

    pub fn write_file(&self, path: &Path) -> io::Result<()> {
        let mut f = io::BufWriter::new(File::create(path)?);
        self.write_to(&mut f)?;
        f.flush()
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn value_type(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U8(_) => 0,
        MetaValue::I8(_) => 1,
        MetaValue::U16(_) => 2,
        MetaValue::I16(_) => 3,
        MetaValue::U32(_) => 4,
        MetaValue::I32(_) => 5,
        MetaValue::F32(_) => 6,
        MetaValue::Bool(_) => 7,
        MetaValue::String(_) => 8,
        MetaValue::Array(_) => 9,
        MetaValue::U64(_) => 10,
        MetaValue::I64(_) => 11,
        MetaValue::F64(_) => 12,
    }
}

fn write_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(u8::from(*x)),
        MetaValue::String(s) => write_str(out, s),
        MetaValue::Array(items) => {
            let elem = items.first().map(value_type).unwrap_or(8);
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                write_value(out, it);
            }
        }
    }
}

/// The GGUF type id of `ty` (inverse of [`GgmlType::from_u32`]).
pub fn ggml_type_id(ty: GgmlType) -> u32 {
    (0..64).find(|&id| GgmlType::from_u32(id) == Some(ty)).expect("every GgmlType has an id")
}
