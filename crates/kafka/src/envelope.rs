//! The wire form of an outbox event: a versioned envelope in JSON
//! (`application/json`, the default) or protobuf (`application/x-protobuf`,
//! `immersiverse.auth.v1.EventEnvelope` in `proto/.../events.proto`).

use prost::Message;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::events::StoredEvent;
use auth_proto as pb;

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

/// Why an event has no wire form. The relay keeps such an event in the
/// outbox (counted and logged) rather than publish an empty or partial
/// payload.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("occurred_at {0} is outside years 1 to 9999")]
    OccurredAt(time::OffsetDateTime),
    #[error("data is not a JSON object")]
    DataNotObject,
    #[error("a number in data has no float form")]
    Number,
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
}

pub fn encode(event: &StoredEvent, format: EventFormat) -> Result<Vec<u8>, EncodeError> {
    // RFC 3339 and google.protobuf.Timestamp both stop at these years.
    if !(1..=9999).contains(&event.occurred_at.year()) {
        return Err(EncodeError::OccurredAt(event.occurred_at));
    }
    match format {
        EventFormat::Json => {
            let envelope = JsonEnvelope {
                event_id: event.id.to_string(),
                event_type: event.event_type.clone(),
                occurred_at: event
                    .occurred_at
                    .to_offset(time::UtcOffset::UTC)
                    .format(&time::format_description::well_known::Rfc3339)
                    .map_err(|_| EncodeError::OccurredAt(event.occurred_at))?,
                user_id: event.user_id.map(|u| u.to_string()),
                schema_version: SCHEMA_VERSION,
                data: event.data.clone(),
            };
            Ok(serde_json::to_vec(&envelope)?)
        }
        EventFormat::Protobuf => Ok(pb::EventEnvelope {
            event_id: event.id.to_string(),
            event_type: event.event_type.clone(),
            occurred_at: Some(prost_types::Timestamp {
                seconds: event.occurred_at.unix_timestamp(),
                nanos: i32::try_from(event.occurred_at.nanosecond()).unwrap_or(0),
            }),
            user_id: event.user_id.map(|u| u.to_string()).unwrap_or_default(),
            schema_version: SCHEMA_VERSION,
            data: match to_proto_value(&event.data)?.kind {
                Some(prost_types::value::Kind::StructValue(s)) => Some(s),
                _ => return Err(EncodeError::DataNotObject),
            },
        }
        .encode_to_vec()),
    }
}

/// serde_json → google.protobuf.Value.
fn to_proto_value(value: &Value) -> Result<prost_types::Value, EncodeError> {
    use prost_types::value::Kind;
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().ok_or(EncodeError::Number)?),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(to_proto_value).collect::<Result<_, _>>()?,
        }),
        Value::Object(map) => Kind::StructValue(prost_types::Struct {
            fields: map
                .iter()
                .map(|(k, v)| Ok((k.clone(), to_proto_value(v)?)))
                .collect::<Result<_, EncodeError>>()?,
        }),
    };
    Ok(prost_types::Value { kind: Some(kind) })
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
        let json: JsonEnvelope =
            serde_json::from_slice(&encode(&e, EventFormat::Json).unwrap()).unwrap();
        let proto =
            pb::EventEnvelope::decode(encode(&e, EventFormat::Protobuf).unwrap().as_slice())
                .unwrap();
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

    /// Failure class: input malformed — an event whose time or data has no
    /// wire form is an error, never an empty or partial payload.
    #[test]
    fn an_event_without_a_wire_form_is_an_error_not_an_empty_payload() {
        let mut bad_time = event();
        bad_time.occurred_at = time::Date::from_calendar_date(-1, time::Month::June, 1)
            .unwrap()
            .midnight()
            .assume_utc();
        let mut bad_data = event();
        bad_data.data = serde_json::json!(["not", "an", "object"]);
        for format in [EventFormat::Json, EventFormat::Protobuf] {
            assert!(
                matches!(encode(&bad_time, format), Err(EncodeError::OccurredAt(_))),
                "{format:?}"
            );
        }
        assert!(matches!(
            encode(&bad_data, EventFormat::Protobuf),
            Err(EncodeError::DataNotObject)
        ));
    }
}
