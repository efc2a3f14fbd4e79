//! An OpenAPI 3.1 document built from the same routes and descriptors the
//! gateway serves, so it cannot drift from the REST surface.

use std::collections::{BTreeMap, BTreeSet};

use otherix_errors::ErrorCode;
use prost_reflect::{DescriptorPool, FieldDescriptor, Kind, MessageDescriptor, Value};
use serde_json::{Map, Value as Json, json};

use crate::{BodyRule, Route};

/// The interactive reference served at `/docs`: one static page, embedded
/// in the binary, that reads `/openapi.json` (no CDN, nothing downloaded).
pub const DOCS_HTML: &str = include_str!("docs.html");

/// Builds the document for `routes` (their descriptors come from `pool`).
pub fn document(pool: &DescriptorPool, routes: &[Route], title: &str, version: &str) -> Json {
    let mut schemas: BTreeMap<String, Json> = BTreeMap::new();
    let mut pending: Vec<MessageDescriptor> = Vec::new();
    let mut paths: BTreeMap<String, Map<String, Json>> = BTreeMap::new();
    let mut tags: BTreeSet<String> = BTreeSet::new();
    let behavior = pool.get_extension_by_name("google.api.field_behavior");
    let access = pool.get_extension_by_name("otherix.v1.access");

    for route in routes {
        let method = route.method();
        let service = method.parent_service().name().to_owned();
        tags.insert(service.clone());
        let input = method.input();
        let bound: Vec<String> = route.template().fields().map(str::to_owned).collect();
        let mut params = Vec::new();
        for field in &bound {
            let schema = crate::resolve_path(&input, field)
                .map_or(json!({"type": "string"}), |f| field_schema(&f, &mut pending));
            params.push(json!({"name": field, "in": "path", "required": true, "schema": schema}));
        }
        // Fields neither in the path nor in the body travel as query parameters.
        let mut request_body = None;
        match &route.body {
            BodyRule::Whole => {
                pending.push(input.clone());
                request_body = Some(json!({
                    "required": true,
                    "content": {"application/json": {"schema": schema_ref(&input)}}
                }));
            }
            BodyRule::Field(f) => {
                request_body = Some(json!({
                    "required": true,
                    "content": {"application/json": {"schema": field_schema(f, &mut pending)}}
                }));
            }
            BodyRule::None => {}
        }
        if !matches!(route.body, BodyRule::Whole) {
            for f in input.fields() {
                let taken = bound.iter().any(|b| b == f.name() || b.starts_with(&format!("{}.", f.name())))
                    || matches!(&route.body, BodyRule::Field(bf) if bf.name() == f.name());
                if taken || f.is_map() || matches!(f.kind(), Kind::Message(ref m) if !is_string_wkt(m)) {
                    continue;
                }
                let required = has_behavior(&behavior, &f, "REQUIRED");
                params.push(json!({
                    "name": f.name(),
                    "in": "query",
                    "required": required,
                    "schema": field_schema(&f, &mut pending),
                    "explode": true,
                }));
            }
        }
        let output = method.output();
        let response_schema = match &route.response_body {
            Some(f) => field_schema(f, &mut pending),
            None => {
                pending.push(output.clone());
                schema_ref(&output)
            }
        };
        let mut op = Map::new();
        op.insert("operationId".into(), json!(format!("{service}_{}", method.name())));
        op.insert("tags".into(), json!([service]));
        op.insert("summary".into(), json!(format!("{}.{}", service, method.name())));
        op.insert(
            "description".into(),
            json!(format!("gRPC: `/{}/{}`", method.parent_service().full_name(), method.name())),
        );
        if !params.is_empty() {
            op.insert("parameters".into(), Json::Array(params));
        }
        if let Some(b) = request_body {
            op.insert("requestBody".into(), b);
        }
        op.insert(
            "responses".into(),
            json!({
                "200": {"description": "OK", "content": {"application/json": {"schema": response_schema}}},
                "default": {"description": "An error (see the code)", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            }),
        );
        if is_public(&access, route) {
            op.insert("security".into(), json!([]));
        }
        let path = openapi_path(route.template().as_str());
        let verb = route.http_method().as_str().to_ascii_lowercase();
        paths.entry(path).or_default().insert(verb, Json::Object(op));
    }

    while let Some(m) = pending.pop() {
        let name = m.full_name().to_owned();
        if schemas.contains_key(&name) {
            continue;
        }
        schemas.insert(name.clone(), json!({}));
        let mut props = Map::new();
        let mut required = Vec::new();
        for f in m.fields() {
            props.insert(f.name().to_owned(), field_schema(&f, &mut pending));
            if has_behavior(&behavior, &f, "REQUIRED") {
                required.push(json!(f.name()));
            }
        }
        let mut schema = json!({"type": "object", "properties": props, "additionalProperties": false});
        if !required.is_empty() {
            schema["required"] = Json::Array(required);
        }
        schemas.insert(name, schema);
    }
    let codes: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    schemas.insert(
        "Error".into(),
        json!({
            "type": "object",
            "required": ["error"],
            "properties": {"error": {
                "type": "object",
                "required": ["code", "message", "details"],
                "properties": {
                    "code": {"type": "string", "description": "A documented code (otherix.v1.ErrorCode); tolerate unknown ones.", "examples": codes},
                    "message": {"type": "string"},
                    "details": {"type": "object", "additionalProperties": true}
                }
            }}
        }),
    );

    json!({
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": "Generated at start-up from the google.api.http annotations of proto/. Errors: see the Error schema and docs/api-conventions.md."
        },
        "tags": tags.iter().map(|t| json!({"name": t})).collect::<Vec<_>>(),
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "description": "An access token from AuthService.Login, or an API token (otx_...)"}}
        },
        "security": [{"bearerAuth": []}]
    })
}

/// `/v1/{parent=projects/*}/things/{name}` becomes `/v1/{parent}/things/{name}`.
fn openapi_path(template: &str) -> String {
    let mut out = String::with_capacity(template.len());
    let mut chars = template.chars();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '{' {
            for c in chars.by_ref() {
                if c == '}' {
                    out.push('}');
                    break;
                }
                if c == '=' {
                    for c in chars.by_ref() {
                        if c == '}' {
                            out.push('}');
                            break;
                        }
                    }
                    break;
                }
                out.push(c);
            }
        }
    }
    out
}

fn schema_ref(m: &MessageDescriptor) -> Json {
    json!({"$ref": format!("#/components/schemas/{}", m.full_name())})
}

fn is_string_wkt(m: &MessageDescriptor) -> bool {
    matches!(m.full_name(), "google.protobuf.Timestamp" | "google.protobuf.Duration" | "google.protobuf.FieldMask")
}

fn has_behavior(ext: &Option<prost_reflect::ExtensionDescriptor>, f: &FieldDescriptor, which: &str) -> bool {
    let Some(ext) = ext else { return false };
    let opts = f.options();
    if !opts.has_extension(ext) {
        return false;
    }
    let Kind::Enum(e) = ext.kind() else { return false };
    let want = e.get_value_by_name(which).map(|v| v.number());
    match opts.get_extension(ext).as_ref() {
        Value::List(items) => items.iter().any(|v| v.as_enum_number() == want),
        _ => false,
    }
}

fn is_public(ext: &Option<prost_reflect::ExtensionDescriptor>, route: &Route) -> bool {
    let Some(ext) = ext else { return false };
    let opts = route.method().options();
    if !opts.has_extension(ext) {
        return false;
    }
    match opts.get_extension(ext).as_ref() {
        Value::Message(rule) => rule.get_field_by_name("public").is_some_and(|v| v.as_bool() == Some(true)),
        _ => false,
    }
}

fn field_schema(f: &FieldDescriptor, pending: &mut Vec<MessageDescriptor>) -> Json {
    if f.is_map() {
        let Kind::Message(entry) = f.kind() else { return json!({"type": "object"}) };
        let value = entry.map_entry_value_field();
        return json!({"type": "object", "additionalProperties": field_schema(&value, pending)});
    }
    let one = kind_schema(&f.kind(), pending);
    if f.is_list() { json!({"type": "array", "items": one}) } else { one }
}

fn kind_schema(kind: &Kind, pending: &mut Vec<MessageDescriptor>) -> Json {
    match kind {
        Kind::Double | Kind::Float => json!({"type": "number"}),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => json!({"type": "integer", "format": "int32"}),
        Kind::Uint32 | Kind::Fixed32 => json!({"type": "integer", "format": "int64", "minimum": 0}),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => json!({"type": "integer", "format": "int64"}),
        Kind::Uint64 | Kind::Fixed64 => json!({"type": "integer", "minimum": 0}),
        Kind::Bool => json!({"type": "boolean"}),
        Kind::String => json!({"type": "string"}),
        Kind::Bytes => json!({"type": "string", "contentEncoding": "base64"}),
        Kind::Enum(e) => json!({"type": "string", "enum": e.values().map(|v| v.name().to_owned()).collect::<Vec<_>>()}),
        Kind::Message(m) => match m.full_name() {
            "google.protobuf.Timestamp" => json!({"type": "string", "format": "date-time"}),
            "google.protobuf.Duration" => json!({"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?s$"}),
            "google.protobuf.FieldMask" => json!({"type": "string"}),
            "google.protobuf.Struct" => json!({"type": "object", "additionalProperties": true}),
            "google.protobuf.Value" => json!({}),
            "google.protobuf.ListValue" => json!({"type": "array"}),
            "google.protobuf.Empty" => json!({"type": "object"}),
            name if name.starts_with("google.protobuf.") && name.ends_with("Value") => {
                m.get_field_by_name("value").map_or(json!({}), |v| kind_schema(&v.kind(), pending))
            }
            _ => {
                pending.push(m.clone());
                schema_ref(m)
            }
        },
    }
}
