//! A token's claims, read where they lie in the JSON they came as.
//!
//! Every exchange parses its job token's claims, and reads perhaps a dozen of GitLab's thirty:
//! the registered ones, the policy's bindings, the row's identity columns. serde_json's map
//! made a `String` of every name and of every string value, a quarter of the allocations of
//! an exchange (bench/README.md, thirteenth session). Here the parse keeps the text and notes
//! where each member's name and value lie; a string without escapes becomes a `Value` only
//! when it is first read, and the map is made only for what walks all of it (the audit page,
//! `policy explain`, a claim added).

use std::borrow::Cow;
use std::ops::Range;
use std::sync::OnceLock;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::claim_text;

/// A token's claims as parsed, and, until something adds to them, the JSON they were parsed
/// from: the audit row stores that text as it came, where Postgres reads it alike
/// (`readable_as_sent` in `audit/record.rs`), rather than writing the fields out again (a few
/// microseconds an exchange; bench/README.md, eleventh session). Both say the same: a
/// repeated name keeps its last value, in [`Claims::get`] and the map as in Postgres' jsonb, so
/// the row shows the value the policy decided on. Every change goes through [`Claims::insert`],
/// which drops the text.
#[derive(Clone)]
pub struct Claims {
    /// The JSON these claims were parsed from, while nothing has been added to them.
    received: Option<String>,
    /// Each member of `received`, in order, while reads go through them (see [`Claims::get`]);
    /// empty once the map is the only copy.
    members: Vec<Member>,
    /// serde_json's map of the claims: made when first needed while `members` serve reads.
    fields: OnceLock<Map<String, Value>>,
}

#[derive(Clone)]
struct Member {
    /// Where the name lies in the received text (a name with escapes sends every read to the map).
    name: Range<usize>,
    /// A string value without escapes: where its characters lie, quotes excluded.
    plain_text: Option<Range<usize>>,
    /// The value: set by the parse, or for a plain string when first read.
    value: OnceLock<Value>,
}

impl Claims {
    /// A JSON object, kept as the text it came as.
    pub fn parse(json: Vec<u8>) -> Result<Self, serde_json::Error> {
        let start = json.as_ptr() as usize;
        let at = |text: &str| {
            let offset = text.as_ptr() as usize - start;
            offset..offset + text.len()
        };
        let parsed: Vec<(MemberName<'_>, MemberValue<'_>)> = serde_json::from_slice::<Object<'_>>(&json)?.0;
        let mut members = Vec::with_capacity(parsed.len());
        let mut fields: Option<Map<String, Value>> = None;
        for (name, value) in parsed {
            let MemberName::Borrowed(name) = name else {
                // A name with escapes is not the text it came as; rare enough to read the map.
                fields = Some(serde_json::from_slice(&json)?);
                members.clear();
                break;
            };
            members.push(match value {
                MemberValue::Plain(text) => Member { name: at(name), plain_text: Some(at(text)), value: OnceLock::new() },
                MemberValue::Parsed(value) => Member { name: at(name), plain_text: None, value: OnceLock::from(value) },
            });
        }
        // JSON that parsed is UTF-8 (anything else outside a string is a syntax error).
        let received = String::from_utf8(json).map_err(|_| de::Error::custom("claims are not UTF-8"))?;
        let fields = fields.map_or_else(OnceLock::new, OnceLock::from);
        Ok(Self { received: Some(received), members, fields })
    }

    /// The value of claim `name`: the last one, if the token repeats it.
    pub fn get(&self, name: &str) -> Option<&Value> {
        match self.member(name) {
            Some((text, member)) => member.map(|member| member_value(text, member)),
            None => self.fields().get(name),
        }
    }

    /// Claim `name` if it is a JSON string, read in place when it has no escapes.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        match self.member(name) {
            Some((text, Some(Member { plain_text: Some(range), .. }))) => Some(&text[range.clone()]),
            _ => self.get(name)?.as_str(),
        }
    }

    /// Claim `name` as identity columns and freezes compare it ([`claim_text`]).
    pub fn text(&self, name: &str) -> Option<Cow<'_, str>> {
        match self.get_str(name) {
            Some(text) => Some(Cow::Borrowed(text)),
            None => claim_text(self.get(name)?),
        }
    }

    /// The received text and the last member named `name` (None: no such member), while the
    /// members serve reads; None while the map does.
    fn member(&self, name: &str) -> Option<(&str, Option<&Member>)> {
        let text = self.received.as_deref().filter(|_| !self.members.is_empty())?;
        Some((text, self.members.iter().rev().find(|member| &text[member.name.clone()] == name)))
    }

    /// Every value except strings without escapes, which hold no number: what a check of the
    /// numbers has to look at, without making a `Value` of every string. A value repeated
    /// under one name counts each time.
    pub fn values_other_than_plain_strings(&self) -> impl Iterator<Item = &Value> {
        let (members, fields) = match self.members.is_empty() {
            true => (None, Some(self.fields().values())),
            false => (Some(self.members.iter().filter(|member| member.plain_text.is_none()).filter_map(|member| member.value.get())), None),
        };
        members.into_iter().flatten().chain(fields.into_iter().flatten())
    }

    pub fn insert(&mut self, name: String, value: Value) {
        self.fields();
        self.received = None;
        self.members.clear();
        self.fields.get_mut().expect("made above").insert(name, value);
    }

    /// The JSON these claims were parsed from, while nothing has been added to them.
    pub fn received_json(&self) -> Option<&str> {
        self.received.as_deref()
    }

    /// All the claims, as serde_json's map (made on the first call).
    pub fn fields(&self) -> &Map<String, Value> {
        self.fields.get_or_init(|| {
            let text = self.received.as_deref().unwrap_or_default();
            self.members.iter().map(|member| (text[member.name.clone()].to_owned(), member_value(text, member).clone())).collect()
        })
    }
}

/// A member's value; a plain string's is made on its first read.
fn member_value<'a>(text: &str, member: &'a Member) -> &'a Value {
    member.value.get_or_init(|| Value::String(text[member.plain_text.clone().unwrap_or_default()].to_owned()))
}

impl Default for Claims {
    fn default() -> Self {
        Map::new().into()
    }
}

impl PartialEq for Claims {
    fn eq(&self, other: &Self) -> bool {
        self.fields() == other.fields()
    }
}

impl std::fmt::Debug for Claims {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_map().entries(self.fields()).finish()
    }
}

impl From<Map<String, Value>> for Claims {
    fn from(fields: Map<String, Value>) -> Self {
        Self { received: None, members: Vec::new(), fields: OnceLock::from(fields) }
    }
}

/// Where policies and templates look a claim up: a token's [`Claims`], or a plain map (a
/// policy's sample claims, a stored row's, `policy explain`'s file).
pub trait ClaimLookup {
    fn claim(&self, name: &str) -> Option<&Value>;

    /// The claim if it is a JSON string.
    fn claim_str(&self, name: &str) -> Option<&str> {
        self.claim(name)?.as_str()
    }
}

impl ClaimLookup for Claims {
    fn claim(&self, name: &str) -> Option<&Value> {
        self.get(name)
    }

    fn claim_str(&self, name: &str) -> Option<&str> {
        self.get_str(name)
    }
}

impl ClaimLookup for Map<String, Value> {
    fn claim(&self, name: &str) -> Option<&Value> {
        self.get(name)
    }
}

/// A JSON object's members in order, repeats included, borrowing what needs no unescaping.
struct Object<'de>(Vec<(MemberName<'de>, MemberValue<'de>)>);

enum MemberName<'de> {
    Borrowed(&'de str),
    Escaped,
}

enum MemberValue<'de> {
    /// A string without escapes, as it lies in the text.
    Plain(&'de str),
    /// Anything else, as serde_json reads it into a `Value`.
    Parsed(Value),
}

impl<'de> Deserialize<'de> for Object<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = Object<'de>;
            fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::with_capacity(access.size_hint().unwrap_or(32));
                while let Some(member) = access.next_entry()? {
                    members.push(member);
                }
                Ok(Object(members))
            }
        }
        deserializer.deserialize_map(ObjectVisitor)
    }
}

impl<'de> Deserialize<'de> for MemberName<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl<'de> Visitor<'de> for NameVisitor {
            type Value = MemberName<'de>;
            fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str("a claim name")
            }
            fn visit_borrowed_str<E: de::Error>(self, name: &'de str) -> Result<Self::Value, E> {
                Ok(MemberName::Borrowed(name))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(MemberName::Escaped)
            }
        }
        deserializer.deserialize_str(NameVisitor)
    }
}

impl<'de> Deserialize<'de> for MemberValue<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ValueVisitor;
        impl<'de> Visitor<'de> for ValueVisitor {
            type Value = MemberValue<'de>;
            fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str("a JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Self::Value, E> {
                Ok(MemberValue::Plain(text))
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
                Ok(MemberValue::Parsed(Value::String(text.to_owned())))
            }
            fn visit_bool<E: de::Error>(self, flag: bool) -> Result<Self::Value, E> {
                Ok(MemberValue::Parsed(Value::Bool(flag)))
            }
            fn visit_i64<E: de::Error>(self, number: i64) -> Result<Self::Value, E> {
                Ok(MemberValue::Parsed(Value::from(number)))
            }
            fn visit_u64<E: de::Error>(self, number: u64) -> Result<Self::Value, E> {
                Ok(MemberValue::Parsed(Value::from(number)))
            }
            fn visit_f64<E: de::Error>(self, number: f64) -> Result<Self::Value, E> {
                Ok(MemberValue::Parsed(Value::from(number)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(MemberValue::Parsed(Value::Null))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, access: A) -> Result<Self::Value, A::Error> {
                Value::deserialize(de::value::SeqAccessDeserializer::new(access)).map(MemberValue::Parsed)
            }
            fn visit_map<A: MapAccess<'de>>(self, access: A) -> Result<Self::Value, A::Error> {
                Value::deserialize(de::value::MapAccessDeserializer::new(access)).map(MemberValue::Parsed)
            }
        }
        deserializer.deserialize_any(ValueVisitor)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(text: &str) -> Result<Claims, serde_json::Error> {
        Claims::parse(text.as_bytes().to_vec())
    }

    /// What serde_json's own map makes of the same text, the reading these claims must match.
    fn as_serde_json_reads_it(text: &str) -> Map<String, Value> {
        serde_json::from_str(text).unwrap()
    }

    const GITLAB_SHAPED: &str = r#"{"iss":"https://gitlab.example.com","sub":"project_path:group/app:ref_type:branch:ref:main",
        "aud":["credbroker","other"],"exp":1700003600,"iat":1700000000,"nbf":1699999990,"jti":"b6c1-44",
        "project_path":"group/app","ref_protected":"true","project_id":"42","namespace_id":7,"user_email":null,
        "flags":{"a":[1,2.5,"x"],"b":true},"job_id":"1001","path":"a\/b","note":"caf\u00e9 \"quoted\""}"#;

    #[test]
    fn every_claim_reads_as_serde_json_reads_it() {
        let claims = parse(GITLAB_SHAPED).unwrap();
        let expected = as_serde_json_reads_it(GITLAB_SHAPED);
        for (name, value) in &expected {
            assert_eq!(claims.get(name), Some(value), "claim {name}");
        }
        assert_eq!(claims.get("absent"), None);
        assert_eq!(claims.fields(), &expected);
        assert_eq!(claims.received_json(), Some(GITLAB_SHAPED));
    }

    #[test]
    fn reading_a_claim_makes_neither_the_map_nor_the_other_strings() {
        let claims = parse(GITLAB_SHAPED).unwrap();
        assert_eq!(claims.get("project_path"), Some(&json!("group/app")));
        assert_eq!(claims.get("exp"), Some(&json!(1700003600)));
        assert!(claims.fields.get().is_none(), "the map was made for a read");
        let made: Vec<&str> = claims
            .members
            .iter()
            .filter(|member| member.plain_text.is_some() && member.value.get().is_some())
            .map(|member| &GITLAB_SHAPED[member.name.clone()])
            .collect();
        assert_eq!(made, ["project_path"]);
    }

    #[test]
    fn strings_read_in_place_and_as_text_like_their_values() {
        let claims = parse(GITLAB_SHAPED).unwrap();
        let expected = as_serde_json_reads_it(GITLAB_SHAPED);
        for (name, value) in &expected {
            assert_eq!(claims.get_str(name), value.as_str(), "claim {name}");
            assert_eq!(claims.text(name), claim_text(value), "claim {name}");
        }
        assert_eq!(claims.get_str("absent"), None);
        assert_eq!(claims.text("namespace_id").as_deref(), Some("7"));
        assert_eq!(claims.get_str("note"), Some("café \"quoted\""));
        let unmade =
            |name: &str| claims.members.iter().rev().find(|member| &GITLAB_SHAPED[member.name.clone()] == name).unwrap().value.get().is_none();
        assert!(unmade("project_path") && unmade("iss"), "reading a plain string as text made its Value");
        assert!(claims.fields.get().is_none());
    }

    #[test]
    fn a_repeated_name_reads_its_last_value_as_in_the_map() {
        let text = r#"{"ref":"main","ref":"evil","n":1,"n":"two"}"#;
        let claims = parse(text).unwrap();
        assert_eq!(claims.get("ref"), Some(&json!("evil")));
        assert_eq!(claims.get_str("ref"), Some("evil"));
        assert_eq!(claims.get("n"), Some(&json!("two")));
        assert_eq!(claims.fields(), &as_serde_json_reads_it(text));
    }

    #[test]
    fn a_name_with_escapes_reads_through_the_map() {
        let text = r#"{"r\u0065f":"main","sub":"job"}"#;
        let claims = parse(text).unwrap();
        assert_eq!(claims.get("ref"), Some(&json!("main")));
        assert_eq!(claims.get("sub"), Some(&json!("job")));
        assert_eq!(claims.fields(), &as_serde_json_reads_it(text));
        assert_eq!(claims.received_json(), Some(text));
    }

    #[test]
    fn only_a_json_object_parses() {
        for text in ["[1,2]", "\"claims\"", "{\"a\":1", "{\"a\":1} x", "", "{\"a\":\"\\ud800\"}"] {
            assert!(parse(text).is_err(), "{text:?} parsed");
            assert!(serde_json::from_str::<Map<String, Value>>(text).is_err(), "serde_json's map takes {text:?}");
        }
        assert!(Claims::parse(b"{\"a\":\"\xff\"}".to_vec()).is_err());
        assert_eq!(parse("{}").unwrap().fields(), &Map::new());
    }

    #[test]
    fn numbers_are_looked_at_and_plain_strings_are_not() {
        let claims = parse(r#"{"s":"1.5","e":"caf\u00e9","f":1.5,"i":3,"a":[2.5]}"#).unwrap();
        let looked_at: Vec<&Value> = claims.values_other_than_plain_strings().collect();
        assert_eq!(looked_at, [&json!("café"), &json!(1.5), &json!(3), &json!([2.5])]);
    }

    #[test]
    fn an_added_claim_drops_the_text_and_reads_like_the_rest() {
        let mut claims = parse(r#"{"sub":"job","ref":"main"}"#).unwrap();
        claims.insert("delivery_id".into(), json!("d1"));
        assert_eq!(claims.received_json(), None);
        assert_eq!(claims.get("delivery_id"), Some(&json!("d1")));
        assert_eq!(claims.get("ref"), Some(&json!("main")));
        assert_eq!(Value::Object(claims.fields().clone()), json!({"sub": "job", "ref": "main", "delivery_id": "d1"}));
        let copy = claims.clone();
        assert_eq!(copy, claims);
        assert_eq!(copy.get("sub"), Some(&json!("job")));
    }

    #[test]
    fn a_copy_reads_alike_before_and_after_a_read() {
        let claims = parse(GITLAB_SHAPED).unwrap();
        let before = claims.clone();
        assert_eq!(claims.get("jti"), Some(&json!("b6c1-44")));
        let after = claims.clone();
        for copy in [before, after] {
            assert_eq!(copy.get("jti"), Some(&json!("b6c1-44")));
            assert_eq!(copy.received_json(), Some(GITLAB_SHAPED));
            assert_eq!(copy, claims);
        }
    }
}
