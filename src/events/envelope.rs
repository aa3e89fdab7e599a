//! The wire form of an outbox event: a versioned envelope in JSON
//! (`application/json`, the default) or protobuf (`application/x-protobuf`,
//! `immersiverse.auth.v1.EventEnvelope` in `proto/.../events.proto`).

use prost::Message;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::StoredEvent;
use crate::grpc::pb;

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventFormat {
    Json,
    Protobuf,
}

impl EventFormat {
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::Protobuf => "application/x-protobuf",
        }
    }
}

/// The JSON envelope.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct JsonEnvelope {
    pub event_id: String,
    pub event_type: String,
    /// RFC 3339.
    pub occurred_at: String,
    pub user_id: Option<String>,
    pub schema_version: u32,
    pub data: Value,
}

pub fn encode(event: &StoredEvent, format: EventFormat) -> Vec<u8> {
    match format {
        EventFormat::Json => {
            let envelope = JsonEnvelope {
                event_id: event.id.to_string(),
                event_type: event.event_type.clone(),
                occurred_at: event
                    .occurred_at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
                user_id: event.user_id.map(|u| u.to_string()),
                schema_version: SCHEMA_VERSION,
                data: event.data.clone(),
            };
            serde_json::to_vec(&envelope).unwrap_or_default()
        }
        EventFormat::Protobuf => pb::EventEnvelope {
            event_id: event.id.to_string(),
            event_type: event.event_type.clone(),
            occurred_at: Some(prost_types::Timestamp {
                seconds: event.occurred_at.unix_timestamp(),
                nanos: i32::try_from(event.occurred_at.nanosecond()).unwrap_or(0),
            }),
            user_id: event.user_id.map(|u| u.to_string()).unwrap_or_default(),
            schema_version: SCHEMA_VERSION,
            data: match to_proto_value(&event.data).kind {
                Some(prost_types::value::Kind::StructValue(s)) => Some(s),
                _ => None,
            },
        }
        .encode_to_vec(),
    }
}

/// serde_json → google.protobuf.Value.
fn to_proto_value(value: &Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(to_proto_value).collect(),
        }),
        Value::Object(map) => Kind::StructValue(prost_types::Struct {
            fields: map
                .iter()
                .map(|(k, v)| (k.clone(), to_proto_value(v)))
                .collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> StoredEvent {
        StoredEvent {
            id: uuid::Uuid::now_v7(),
            event_type: "roles_changed".into(),
            user_id: Some(uuid::Uuid::now_v7()),
            occurred_at: time::OffsetDateTime::now_utc(),
            data: serde_json::json!({ "roles": ["admin", "user"], "by": null }),
            traceparent: None,
            attempts: 0,
        }
    }

    #[test]
    fn json_and_protobuf_carry_the_same_envelope() {
        let e = event();
        let json: JsonEnvelope = serde_json::from_slice(&encode(&e, EventFormat::Json)).unwrap();
        let proto =
            pb::EventEnvelope::decode(encode(&e, EventFormat::Protobuf).as_slice()).unwrap();
        assert_eq!(json.event_id, proto.event_id);
        assert_eq!(json.event_type, proto.event_type);
        assert_eq!(json.user_id.unwrap(), proto.user_id);
        assert_eq!((json.schema_version, proto.schema_version), (1, 1));
        let roles = &proto.data.unwrap().fields["roles"];
        assert!(
            matches!(&roles.kind, Some(prost_types::value::Kind::ListValue(l)) if l.values.len() == 2)
        );
        assert_eq!(json.data["roles"][0], "admin");
    }
}
