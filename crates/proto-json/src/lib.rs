//! Proto3 JSON in and out of dynamic messages, and binding path and query
//! parameters to request fields.

use otherix_errors::ApiError;
use prost::Message;
use prost_reflect::{
    DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, ReflectMessage, SerializeOptions,
    Value,
};
use serde_json::{Map, Value as Json};

const SERIALIZE: SerializeOptions =
    SerializeOptions::new().use_proto_field_name(true).stringify_64_bit_integers(false).skip_default_fields(false);
const DESERIALIZE: DeserializeOptions = DeserializeOptions::new().deny_unknown_fields(true);

/// Well-known types whose JSON form is a string.
const STRING_WKTS: &[&str] = &["google.protobuf.Timestamp", "google.protobuf.Duration", "google.protobuf.FieldMask"];

/// Fills `msg` (or its body field) from a JSON request body.
pub fn merge_body(msg: &mut DynamicMessage, field: Option<&FieldDescriptor>, raw: &[u8]) -> Result<(), ApiError> {
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    let value = parse_strict(raw)?;
    let value = match field {
        Some(f) => {
            let mut wrapped = Map::new();
            wrapped.insert(f.name().to_owned(), value);
            Json::Object(wrapped)
        }
        None => {
            if !value.is_object() {
                return Err(ApiError::invalid_field("body", "the request body must be a JSON object"));
            }
            value
        }
    };
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(value, &mut track);
    let decoded = match DynamicMessage::deserialize_with_options(msg.descriptor(), de, &DESERIALIZE) {
        Ok(d) => d,
        Err(e) => {
            let path = field_path(&track.path());
            let field = if path.is_empty() { "body".to_owned() } else { path };
            return Err(ApiError::invalid_field(&field, format!("invalid request body: {field}: {e}")));
        }
    };
    msg.merge(decoded.encode_to_vec().as_slice()).map_err(|_| ApiError::internal())
}

/// A serde path as a field path: `spec.disks[0].size_gib`, no leading `.`.
fn field_path(path: &serde_path_to_error::Path) -> String {
    let s = path.to_string();
    if s == "." { String::new() } else { s }
}

/// Parses a JSON body, refusing duplicate object keys (which serde_json would
/// silently resolve to the last one) and naming where the problem is.
pub fn parse_strict(raw: &[u8]) -> Result<Json, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(raw);
    let parsed: Result<Strict, _> = serde_path_to_error::deserialize(&mut de);
    let value = match parsed {
        Ok(Strict(v)) => v,
        Err(e) => {
            let path = field_path(e.path());
            let inner = e.into_inner();
            let field = if path.is_empty() { "body".to_owned() } else { path };
            let message = if inner.is_data() {
                format!("the request body is invalid at {field}: {inner}")
            } else {
                format!("the request body is not valid JSON: {inner}")
            };
            return Err(ApiError::invalid_field(&field, message));
        }
    };
    de.end().map_err(|e| ApiError::invalid_field("body", format!("the request body is not valid JSON: {e}")))?;
    Ok(value)
}

/// Refuses the value of a key seen before.
struct Duplicate(String);

impl<'de> serde::de::DeserializeSeed<'de> for Duplicate {
    type Value = Json;
    fn deserialize<D: serde::Deserializer<'de>>(self, _: D) -> Result<Json, D::Error> {
        Err(serde::de::Error::custom(format!("duplicate key {:?}", self.0)))
    }
}

/// A JSON value whose objects have no duplicate keys.
struct Strict(Json);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
        Ok(Json::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
        Ok(Json::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Json, E> {
        Ok(Json::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Json, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Json::Null, Json::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Json, E> {
        Ok(Json::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Json, E> {
        Ok(Json::String(v))
    }
    fn visit_unit<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_none<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Json::Array(out))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                // Failing inside next_value_seed puts the key in the error's path.
                return map.next_value_seed(Duplicate(key));
            }
            let Strict(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Json::Object(out))
    }
}

/// Binds `name=value` parameters (dotted field paths) into `msg`; a
/// parameter naming a field in `reserved` (bound elsewhere) is refused.
pub fn merge_params(
    msg: &mut DynamicMessage,
    params: &[(String, String)],
    reserved: &[String],
    what: &str,
) -> Result<(), ApiError> {
    if params.is_empty() {
        return Ok(());
    }
    let desc = msg.descriptor();
    let mut overlay = Map::new();
    for (path, raw) in params {
        if reserved.iter().any(|r| path == r || path.starts_with(&format!("{r}."))) {
            return Err(ApiError::invalid_field(path, format!("{what} {path} is already bound by the path or body")));
        }
        let (fields, leaf) =
            resolve(&desc, path).ok_or_else(|| ApiError::invalid_field(path, format!("unknown {what} {path:?}")))?;
        if leaf.is_map() {
            return Err(ApiError::invalid_field(path, format!("{what} {path} is a map and cannot be bound")));
        }
        let value = scalar_json(&leaf, raw)
            .map_err(|reason| ApiError::invalid_field(path, format!("{what} {path}: {reason}")))?;
        let mut obj = &mut overlay;
        for f in &fields {
            obj = obj
                .entry(f.name().to_owned())
                .or_insert_with(|| Json::Object(Map::new()))
                .as_object_mut()
                .ok_or_else(ApiError::internal)?;
        }
        if leaf.is_list() {
            let slot = obj.entry(leaf.name().to_owned()).or_insert_with(|| Json::Array(Vec::new()));
            slot.as_array_mut().ok_or_else(ApiError::internal)?.push(value);
        } else if obj.insert(leaf.name().to_owned(), value).is_some() {
            return Err(ApiError::invalid_field(path, format!("{what} {path} given twice")));
        }
    }
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(Json::Object(overlay), &mut track);
    let decoded = DynamicMessage::deserialize_with_options(desc, de, &DESERIALIZE).map_err(|e| {
        let field = field_path(&track.path());
        let field = if field.is_empty() { what.replace(' ', "_") } else { field };
        ApiError::invalid_field(&field, format!("invalid {what} {field}: {e}"))
    })?;
    msg.merge(decoded.encode_to_vec().as_slice()).map_err(|_| ApiError::internal())
}

/// The value at a dotted field path, when it is set (present, or not at
/// its default for fields without presence).
pub fn get_path(msg: &DynamicMessage, path: &str) -> Option<Value> {
    let (trail, leaf) = resolve(&msg.descriptor(), path)?;
    let mut cur = msg.clone();
    for f in trail {
        if !cur.has_field(&f) {
            return None;
        }
        cur = cur.get_field(&f).as_message()?.clone();
    }
    cur.has_field(&leaf).then(|| cur.get_field(&leaf).into_owned())
}

/// The message fields leading to a dotted path, and the leaf field.
fn resolve(desc: &MessageDescriptor, path: &str) -> Option<(Vec<FieldDescriptor>, FieldDescriptor)> {
    let mut cur = desc.clone();
    let mut trail = Vec::new();
    let mut parts = path.split('.').peekable();
    while let Some(p) = parts.next() {
        let f = cur.get_field_by_name(p).or_else(|| cur.get_field_by_json_name(p))?;
        if parts.peek().is_none() {
            return Some((trail, f));
        }
        if f.is_list() || f.is_map() {
            return None;
        }
        let next = f.kind().as_message()?.clone();
        if STRING_WKTS.contains(&next.full_name()) {
            return None;
        }
        trail.push(f);
        cur = next;
    }
    None
}

/// The JSON value a text parameter stands for, by the field's type.
fn scalar_json(field: &FieldDescriptor, raw: &str) -> Result<Json, String> {
    kind_json(&field.kind(), raw)
}

fn kind_json(kind: &Kind, raw: &str) -> Result<Json, String> {
    Ok(match kind {
        Kind::Bool => match raw {
            "true" => Json::Bool(true),
            "false" => Json::Bool(false),
            _ => return Err(format!("{raw:?} is not true or false")),
        },
        Kind::Enum(e) => match raw.parse::<i32>() {
            Ok(n) => Json::from(n),
            Err(_) if e.get_value_by_name(raw).is_some() => Json::String(raw.to_owned()),
            Err(_) => return Err(format!("{raw:?} is not a value of {}", e.name())),
        },
        // Proto3 JSON accepts numbers in strings for every numeric type.
        Kind::String
        | Kind::Bytes
        | Kind::Int32
        | Kind::Sint32
        | Kind::Sfixed32
        | Kind::Uint32
        | Kind::Fixed32
        | Kind::Int64
        | Kind::Sint64
        | Kind::Sfixed64
        | Kind::Uint64
        | Kind::Fixed64
        | Kind::Float
        | Kind::Double => Json::String(raw.to_owned()),
        Kind::Message(m) if STRING_WKTS.contains(&m.full_name()) => Json::String(raw.to_owned()),
        Kind::Message(m) if m.full_name().starts_with("google.protobuf.") && m.full_name().ends_with("Value") => {
            let inner = m.get_field_by_name("value").ok_or("not a wrapper type")?;
            kind_json(&inner.kind(), raw)?
        }
        Kind::Message(m) => return Err(format!("a {} cannot be given as text", m.name())),
    })
}

/// Renders a message as proto3 JSON with proto field names; scalars at their
/// default are shown, unset message and optional fields are left out.
pub fn message_to_json(msg: &DynamicMessage) -> Result<Json, ApiError> {
    let mut json = msg.serialize_with_options(serde_json::value::Serializer, &SERIALIZE).map_err(|e| {
        tracing::error!(error = %e, "cannot render a response as JSON");
        ApiError::internal()
    })?;
    prune(msg, &mut json);
    Ok(json)
}

/// Renders one field of a message (for `response_body`).
pub fn field_to_json(msg: &DynamicMessage, field: &FieldDescriptor) -> Result<Json, ApiError> {
    let mut all = message_to_json(msg)?;
    Ok(all.as_object_mut().and_then(|o| o.remove(field.name())).unwrap_or(Json::Null))
}

fn prune(msg: &DynamicMessage, json: &mut Json) {
    let Some(obj) = json.as_object_mut() else { return };
    for field in msg.descriptor().fields() {
        let unset = field.supports_presence() && !msg.has_field(&field);
        if unset {
            obj.remove(field.name());
            continue;
        }
        let Kind::Message(m) = field.kind() else { continue };
        if STRING_WKTS.contains(&m.full_name()) || m.full_name().starts_with("google.protobuf.") || field.is_map() {
            continue;
        }
        let Some(child_json) = obj.get_mut(field.name()) else { continue };
        match (msg.get_field(&field).as_ref(), child_json) {
            (Value::Message(child), j) => prune(child, j),
            (Value::List(items), Json::Array(js)) => {
                for (item, j) in items.iter().zip(js.iter_mut()) {
                    if let Value::Message(child) = item {
                        prune(child, j);
                    }
                }
            }
            _ => {}
        }
    }
}
