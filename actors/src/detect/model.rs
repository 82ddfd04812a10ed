//! Reading an ultralytics ONNX detect export: graph, initializers and metadata.

use crate::frame::Size;
use std::collections::HashMap;
use std::path::Path;

use prost::Message;

use super::DetectError;
use super::onnx_proto::{self as proto, data_type};

/// A constant tensor from the file (initializer, `Constant` node or attribute).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorData {
    pub shape: Vec<usize>,
    pub values: TensorValues,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TensorValues {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

impl TensorData {
    pub fn len(&self) -> usize {
        match &self.values {
            TensorValues::F32(v) => v.len(),
            TensorValues::I64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as integers (shapes, axes, indices).
    pub fn as_i64(&self) -> Vec<i64> {
        match &self.values {
            TensorValues::F32(v) => v.iter().map(|&x| x as i64).collect(),
            TensorValues::I64(v) => v.clone(),
        }
    }

    fn from_proto(t: &proto::TensorProto) -> Result<Self, String> {
        if !t.external_data.is_empty() {
            return Err("tensors stored in external files are not supported".into());
        }
        let shape = t.dims.iter().map(|&d| usize::try_from(d).map_err(|_| format!("negative dimension {d}"))).collect::<Result<Vec<_>, _>>()?;
        let count = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or("tensor too large")?;
        let raw = t.raw_data.as_deref();
        let values = match t.data_type.unwrap_or(0) {
            data_type::FLOAT => TensorValues::F32(match raw {
                Some(bytes) => le_values(bytes, count, f32::from_le_bytes)?,
                None => t.float_data.clone(),
            }),
            data_type::DOUBLE => TensorValues::F32(match raw {
                Some(bytes) => le_values(bytes, count, f64::from_le_bytes)?.into_iter().map(|x| x as f32).collect(),
                None => t.double_data.iter().map(|&x| x as f32).collect(),
            }),
            data_type::INT64 => TensorValues::I64(match raw {
                Some(bytes) => le_values(bytes, count, i64::from_le_bytes)?,
                None => t.int64_data.clone(),
            }),
            data_type::INT32 => TensorValues::I64(match raw {
                Some(bytes) => le_values(bytes, count, i32::from_le_bytes)?.into_iter().map(i64::from).collect(),
                None => t.int32_data.iter().map(|&x| i64::from(x)).collect(),
            }),
            data_type::BOOL => TensorValues::I64(match raw {
                Some(bytes) => bytes.iter().map(|&b| i64::from(b != 0)).collect(),
                None => t.int32_data.iter().map(|&x| i64::from(x != 0)).collect(),
            }),
            other => return Err(format!("tensor element type {other} is not supported")),
        };
        let tensor = TensorData { shape, values };
        if tensor.len() != count {
            return Err(format!("tensor holds {} values for shape {:?}", tensor.len(), tensor.shape));
        }
        Ok(tensor)
    }
}

fn le_values<T, const N: usize>(bytes: &[u8], count: usize, from: fn([u8; N]) -> T) -> Result<Vec<T>, String> {
    // The shape comes from the file: its byte size may not even fit in a usize.
    let expected = count.checked_mul(N).ok_or_else(|| format!("a tensor of {count} values is too large"))?;
    if bytes.len() != expected {
        return Err(format!("raw data has {} bytes, expected {expected}", bytes.len()));
    }
    Ok(bytes.chunks_exact(N).map(|c| from(c.try_into().expect("chunks_exact gives N bytes"))).collect())
}

/// A node attribute.
#[derive(Debug, Clone, PartialEq)]
pub enum Attribute {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
    Floats(Vec<f32>),
    String(String),
    Tensor(TensorData),
}

/// One operator application.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub op_type: String,
    /// Input value names; an empty name is an omitted optional input.
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attributes: HashMap<String, Attribute>,
}

/// A graph input: name and shape, where `None` is a symbolic (dynamic) dimension.
#[derive(Debug, Clone)]
pub struct GraphInput {
    pub name: String,
    pub shape: Vec<Option<usize>>,
}

/// An ONNX model as read from the file, before planning.
#[derive(Debug, Clone)]
pub struct OnnxModel {
    pub nodes: Vec<Node>,
    pub initializers: HashMap<String, TensorData>,
    pub inputs: Vec<GraphInput>,
    pub outputs: Vec<String>,
    pub metadata: HashMap<String, String>,
}

impl OnnxModel {
    pub fn load(path: &Path) -> Result<Self, DetectError> {
        let bytes = std::fs::read(path).map_err(|source| DetectError::Io { path: path.to_path_buf(), source })?;
        Self::parse(&bytes).map_err(|message| DetectError::BadModel { path: path.to_path_buf(), message })
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let model = proto::ModelProto::decode(bytes).map_err(|err| format!("not an ONNX model (protobuf decoding failed: {err})"))?;
        let graph = model.graph.ok_or("not an ONNX model (no graph)")?;
        if graph.node.is_empty() {
            return Err("not an ONNX model (the graph has no nodes)".into());
        }
        let mut initializers = HashMap::new();
        for t in &graph.initializer {
            let name = t.name.clone().unwrap_or_default();
            let data = TensorData::from_proto(t).map_err(|e| format!("initializer {name:?}: {e}"))?;
            initializers.insert(name, data);
        }
        let inputs = graph
            .input
            .iter()
            .filter(|i| !initializers.contains_key(i.name.as_deref().unwrap_or_default()))
            .map(|i| GraphInput {
                name: i.name.clone().unwrap_or_default(),
                shape: i
                    .r#type
                    .as_ref()
                    .and_then(|t| t.tensor_type.as_ref())
                    .and_then(|t| t.shape.as_ref())
                    .map(|s| s.dim.iter().map(|d| d.dim_value.and_then(|v| usize::try_from(v).ok()).filter(|&v| v > 0)).collect())
                    .unwrap_or_default(),
            })
            .collect();
        let mut nodes = Vec::with_capacity(graph.node.len());
        for (i, n) in graph.node.iter().enumerate() {
            let name = n.name.clone().filter(|s| !s.is_empty()).unwrap_or_else(|| format!("node#{i}"));
            let domain = n.domain.as_deref().unwrap_or_default();
            if !domain.is_empty() && domain != "ai.onnx" {
                return Err(format!("node {name:?}: operator domain {domain:?} is not supported"));
            }
            let mut attributes = HashMap::new();
            for a in &n.attribute {
                let key = a.name.clone().unwrap_or_default();
                let value = attribute(a).map_err(|e| format!("node {name:?}, attribute {key:?}: {e}"))?;
                attributes.insert(key, value);
            }
            let node = Node { name, op_type: n.op_type.clone().unwrap_or_default(), inputs: n.input.clone(), outputs: n.output.clone(), attributes };
            check_arity(&node)?;
            nodes.push(node);
        }
        let metadata = model.metadata_props.iter().map(|p| (p.key.clone().unwrap_or_default(), p.value.clone().unwrap_or_default())).collect();
        let outputs = graph.output.iter().map(|o| o.name.clone().unwrap_or_default()).collect();
        Ok(OnnxModel { nodes, initializers, inputs, outputs, metadata })
    }
}

/// The inputs an operator cannot do without, per the ONNX operator schemas (opset 11 and
/// later); `None` for operators the engine does not run (it names them in its own error).
fn required_inputs(op: &str) -> Option<usize> {
    Some(match op {
        "Constant" => 0,
        "Sigmoid" | "Exp" | "Split" | "Concat" | "MaxPool" | "Resize" | "Transpose" | "Softmax" | "ReduceMax" | "ReduceSum" | "Shape" | "Unsqueeze"
        | "Cast" | "ConstantOfShape" | "Identity" => 1,
        "Conv" | "Add" | "Sub" | "Mul" | "Div" | "Reshape" | "MatMul" | "Gather" | "Expand" => 2,
        "Slice" | "Range" => 3,
        _ => return None,
    })
}

/// Rejects a node that lacks an input its operator requires, or an output: a damaged file
/// can say anything, and the planner reads the required operands and the first output by
/// position.
fn check_arity(node: &Node) -> Result<(), String> {
    let Some(required) = required_inputs(&node.op_type) else { return Ok(()) };
    let present = node.inputs.iter().take(required).filter(|name| !name.is_empty()).count();
    if present < required {
        return Err(format!("node {:?} ({}) has {present} of the {required} inputs its operator requires", node.name, node.op_type));
    }
    if node.outputs.first().is_none_or(|name| name.is_empty()) {
        return Err(format!("node {:?} ({}) has no output", node.name, node.op_type));
    }
    Ok(())
}

fn attribute(a: &proto::AttributeProto) -> Result<Attribute, String> {
    // AttributeProto.AttributeType: FLOAT=1 INT=2 STRING=3 TENSOR=4 FLOATS=6 INTS=7.
    Ok(match a.r#type.unwrap_or(0) {
        1 => Attribute::Float(a.f.unwrap_or_default()),
        2 => Attribute::Int(a.i.unwrap_or_default()),
        3 => Attribute::String(String::from_utf8_lossy(a.s.as_deref().unwrap_or_default()).into_owned()),
        4 => Attribute::Tensor(TensorData::from_proto(a.t.as_ref().ok_or("tensor attribute without a tensor")?)?),
        6 => Attribute::Floats(a.floats.clone()),
        7 => Attribute::Ints(a.ints.clone()),
        other => return Err(format!("attribute type {other} is not supported")),
    })
}

/// What the model's metadata says about how to use it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// Class names, indexed by class id.
    pub class_names: Vec<String>,
    /// Input height and width the model was exported for.
    pub input_size: Size,
    /// The largest stride of the detection head (input sizes must be multiples of it).
    pub stride: usize,
    /// `description` from the metadata, e.g. "Ultralytics YOLOv12n model".
    pub description: String,
}

impl ModelInfo {
    /// Reads ultralytics metadata: `names` is a Python dict literal (`{0: 'person', ...}`),
    /// `imgsz` a list (`[640, 640]`). A missing `imgsz` falls back to the graph input's shape; a
    /// missing `names` leaves `class_names` empty for the loader to number the classes the
    /// output has.
    pub fn from_metadata(metadata: &HashMap<String, String>, input: &GraphInput) -> Result<Self, String> {
        let class_names = match metadata.get("names") {
            Some(names) => parse_names(names)?,
            None => Vec::new(),
        };
        let imgsz = metadata.get("imgsz").map(|s| parse_int_list(s)).transpose()?;
        // ONNX and ultralytics say height first.
        let (height, width) = match (imgsz.as_deref(), input.shape.as_slice()) {
            (Some([h, w]), _) => (*h, *w),
            (Some([s]), _) => (*s, *s),
            (_, [_, _, Some(h), Some(w)]) => (*h, *w),
            _ => return Err("the model states no input size (no imgsz metadata, dynamic input)".into()),
        };
        let stride = metadata.get("stride").and_then(|s| s.trim().parse().ok()).unwrap_or(32);
        let description = metadata.get("description").map(|s| s.trim().to_string()).unwrap_or_default();
        Ok(ModelInfo { class_names, input_size: Size::new(width, height), stride, description })
    }
}

/// Parses `{0: 'person', 1: "bicycle", ...}` into names ordered by their integer keys.
pub fn parse_names(text: &str) -> Result<Vec<String>, String> {
    let body = text.trim().strip_prefix('{').and_then(|t| t.strip_suffix('}')).ok_or("names is not a dict literal")?;
    let mut pairs: Vec<(usize, String)> = Vec::new();
    let mut rest = body.trim_start();
    while !rest.is_empty() {
        let colon = rest.find(':').ok_or("names: expected `key: 'value'`")?;
        let key: usize = rest[..colon].trim().parse().map_err(|_| format!("names: bad key {:?}", &rest[..colon]))?;
        rest = rest[colon + 1..].trim_start();
        let quote = rest.chars().next().filter(|c| *c == '\'' || *c == '"').ok_or("names: expected a quoted value")?;
        let mut value = String::new();
        let mut chars = rest[1..].char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => {
                    if let Some((_, c)) = chars.next() {
                        value.push(c);
                    }
                }
                Some((i, c)) if c == quote => break i + 1,
                Some((_, c)) => value.push(c),
                None => return Err("names: unterminated string".into()),
            }
        };
        pairs.push((key, value));
        rest = rest[end + 1..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    pairs.sort_by_key(|(k, _)| *k);
    if pairs.iter().enumerate().any(|(i, (k, _))| i != *k) {
        return Err("names: keys are not 0..n".into());
    }
    Ok(pairs.into_iter().map(|(_, v)| v).collect())
}

fn parse_int_list(text: &str) -> Result<Vec<usize>, String> {
    text.trim()
        .trim_start_matches(['[', '('])
        .trim_end_matches([']', ')'])
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().map_err(|_| format!("not an integer list: {text:?}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_dict_literal() {
        let names = parse_names("{0: 'person', 1: \"bi'cycle\", 2: 'it\\'s'}").unwrap();
        assert_eq!(names, ["person", "bi'cycle", "it's"]);
        assert!(parse_names("[1, 2]").is_err());
        assert!(parse_names("{1: 'a'}").is_err(), "keys must start at 0");
    }

    #[test]
    fn int_lists() {
        assert_eq!(parse_int_list("[640, 480]").unwrap(), [640, 480]);
        assert!(parse_int_list("[a]").is_err());
    }

    #[test]
    fn a_shape_whose_byte_size_overflows_is_an_error() {
        // 2^62 floats: the value count fits in a usize, its byte size does not.
        let tensor = proto::TensorProto { dims: vec![1 << 62], data_type: Some(data_type::FLOAT), raw_data: Some(vec![0; 4]), ..Default::default() };
        let err = TensorData::from_proto(&tensor).unwrap_err();
        assert!(err.contains("too large"), "{err}");
        let tensor = proto::TensorProto { dims: vec![1 << 32, 1 << 32], ..tensor };
        assert!(TensorData::from_proto(&tensor).unwrap_err().contains("too large"));
    }

    #[test]
    fn a_node_without_its_required_inputs_or_output_is_an_error() {
        // A Transpose whose input list a damaged file lost: planning read `inputs[0]` and panicked.
        let model = |inputs: Vec<&str>, outputs: Vec<&str>| {
            proto::ModelProto {
                graph: Some(proto::GraphProto {
                    node: vec![proto::NodeProto {
                        name: Some("t".into()),
                        op_type: Some("Transpose".into()),
                        input: inputs.into_iter().map(String::from).collect(),
                        output: outputs.into_iter().map(String::from).collect(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            }
            .encode_to_vec()
        };
        assert!(OnnxModel::parse(&model(vec!["x"], vec!["y"])).is_ok());
        for (inputs, outputs) in [(vec![], vec!["y"]), (vec![""], vec!["y"]), (vec!["x"], vec![]), (vec!["x"], vec![""])] {
            let err = OnnxModel::parse(&model(inputs.clone(), outputs.clone())).unwrap_err();
            assert!(err.contains("node \"t\" (Transpose)"), "{inputs:?} {outputs:?}: {err}");
        }
    }

    #[test]
    fn garbage_is_not_a_model() {
        assert!(OnnxModel::parse(b"definitely not protobuf \xff\xff\xff").is_err());
        assert!(OnnxModel::parse(&[]).is_err());
    }
}
