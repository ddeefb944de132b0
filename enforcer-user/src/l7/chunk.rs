//! A streamed chat or completions chunk (`chat.completion.chunk`,
//! `text_completion`), read for metering without building its JSON tree:
//! each member stays its raw text; only the choices' texts and `usage` are
//! read. Written again only when a member is taken out, from the raw text
//! of the others: what the server sent, byte for byte, less that member.

use std::{borrow::Cow, fmt};

use serde::{
    Deserialize,
    de::{Deserializer, MapAccess, Visitor},
};
use serde_json::value::RawValue;

/// A chunk's members, in order, each value as its raw JSON text.
pub struct Chunk<'a> {
    members: Vec<(Cow<'a, str>, &'a RawValue)>,
}

impl<'a> Chunk<'a> {
    /// `None`: not a JSON object.
    pub fn parse(data: &'a str) -> Option<Self> {
        serde_json::from_str(data).ok()
    }

    /// A member's raw value; the last one of that name, as a JSON parser
    /// that keeps one of each (the client's) reads it.
    fn member(&self, name: &str) -> Option<&'a RawValue> {
        self.members
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| *v)
    }

    /// Whether a member of that name is there (`null` included).
    pub fn has(&self, name: &str) -> bool {
        self.members.iter().any(|(k, _)| k == name)
    }

    /// Calls `each` with every text of its choices, each on its own:
    /// `delta.content`, `delta.refusal`, `delta.reasoning_content`, a tool
    /// call's `function.arguments`, and a completion's `text`. A value that
    /// is not a string is no text; a choice that is not an object has none.
    /// Every object below is read as the chunk is (members as raw text, the
    /// last of a name counts), so a name given twice is read as the
    /// client's parser reads it.
    pub fn texts(&self, mut each: impl FnMut(&str)) {
        let Some(choices) = self.member("choices").and_then(array) else {
            return;
        };
        for choice in choices.into_iter().filter_map(object) {
            if let Some(delta) = choice.member("delta").and_then(object) {
                for name in ["content", "refusal", "reasoning_content"] {
                    if let Some(s) = delta.member(name).and_then(string) {
                        each(&s);
                    }
                }
                let calls = delta.member("tool_calls").and_then(array);
                for call in calls.into_iter().flatten() {
                    let arguments = object(call)
                        .and_then(|c| c.member("function"))
                        .and_then(object)
                        .and_then(|f| f.member("arguments"))
                        .and_then(string);
                    if let Some(s) = arguments {
                        each(&s);
                    }
                }
            }
            if let Some(s) = choice.member("text").and_then(string) {
                each(&s);
            }
        }
    }

    /// `choices` is there and an empty array: OpenAI's usage chunk.
    pub fn no_choices(&self) -> bool {
        self.member("choices")
            .and_then(array)
            .is_some_and(|c| c.is_empty())
    }

    /// Prompt and completion tokens of its `usage`, when that is an object
    /// that has them.
    pub fn usage(&self) -> Option<(u64, u64)> {
        let raw = self.member("usage")?;
        let usage = serde_json::from_str::<serde_json::Value>(raw.get()).ok()?;
        super::llm::usage_counts(&usage)
    }

    /// The chunk again without the members named `name`: every other
    /// member as it came (its name written again, its value as sent).
    /// `None` only if that were not text, which names written by
    /// serde_json and values taken from text cannot be.
    pub fn without(&self, name: &str) -> Option<String> {
        let mut out = Vec::with_capacity(
            self.members
                .iter()
                .map(|(k, v)| k.len() + v.get().len() + 4)
                .sum::<usize>()
                + 2,
        );
        out.push(b'{');
        for (k, v) in self.members.iter().filter(|(k, _)| k != name) {
            if out.len() > 1 {
                out.push(b',');
            }
            // A name written to memory: serializing a string cannot fail.
            let _ = serde_json::to_writer(&mut out, k.as_ref());
            out.push(b':');
            out.extend_from_slice(v.get().as_bytes());
        }
        out.push(b'}');
        String::from_utf8(out).ok()
    }
}

/// A string's value, borrowed when it has no escape.
fn string(raw: &RawValue) -> Option<Cow<'_, str>> {
    serde_json::from_str::<Str<'_>>(raw.get()).ok().map(|s| s.0)
}

/// An object's members, each as raw text.
fn object(raw: &RawValue) -> Option<Chunk<'_>> {
    Chunk::parse(raw.get())
}

/// An array's elements, each as raw text.
fn array(raw: &RawValue) -> Option<Vec<&RawValue>> {
    serde_json::from_str(raw.get()).ok()
}

/// A JSON string, borrowed from the input when it has no escape.
struct Str<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Str<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E>(self, s: String) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(s)))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for Chunk<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Chunk<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Chunk<'de>, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some((k, v)) = map.next_entry::<Str<'de>, &'de RawValue>()? {
                    members.push((k.0, v));
                }
                Ok(Chunk { members })
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The texts `Chunk` reads, in the order read.
    fn texts(data: &str) -> Vec<String> {
        let mut out = vec![];
        Chunk::parse(data)
            .expect("an object")
            .texts(|s| out.push(s.to_owned()));
        out
    }

    #[test]
    fn the_choices_texts_are_read_each_on_its_own() {
        let data = r#"{"id":"c1","object":"chat.completion.chunk","choices":[
            {"index":0,"delta":{"role":"assistant","content":"Hel\u006co","refusal":null}},
            {"index":1,"delta":{"content":null,"reasoning_content":"why","tool_calls":[
                {"index":0,"function":{"name":"f","arguments":"{\"a\":1}"}},
                {"index":1,"type":"function"},
                "garbage"]}},
            "not a choice",
            {"index":2,"text":" done","delta":[1,2]},
            {"index":3,"delta":{"content":["not","text"]}}
        ],"usage":null}"#;
        assert_eq!(texts(data), ["Hello", "why", "{\"a\":1}", " done"]);
        // Choices that are not an array, or none: no text.
        assert!(texts(r#"{"choices":{"delta":{"content":"x"}}}"#).is_empty());
        assert!(texts(r#"{"id":"x"}"#).is_empty());
        // The last of two `choices`, or of two `content`s, is read, as a
        // client's parser keeps it.
        assert_eq!(
            texts(r#"{"choices":[{"text":"first"}],"choices":[{"text":"last"}]}"#),
            ["last"]
        );
        assert_eq!(
            texts(
                r#"{"choices":[{"delta":{"content":"x","content":"yy"},"delta":{"content":"z","refusal":null,"content":"last"}}]}"#
            ),
            ["last"]
        );
        assert!(Chunk::parse("[1]").is_none());
        assert!(Chunk::parse("{\"a\":").is_none());
    }

    #[test]
    fn usage_is_read_and_the_usage_chunk_known() {
        let usage = r#"{"id":"c1","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21}}"#;
        let c = Chunk::parse(usage).expect("object");
        assert_eq!(c.usage(), Some((9, 12)));
        assert!(c.no_choices());
        let c = Chunk::parse(r#"{"choices":[{"delta":{}}],"usage":null}"#).expect("object");
        assert_eq!(c.usage(), None);
        assert!(c.has("usage"));
        assert!(!c.no_choices());
        assert!(!Chunk::parse(r#"{"id":1}"#).expect("object").no_choices());
    }

    #[test]
    fn taking_a_member_out_keeps_the_others_as_sent() {
        let data = r#"{"id":"c\"1","choices" : [ {"delta":{"content":"a\u00e9 b"}} ],"usage":null,"x_sent_ns":17,"usage":{"a":1},"z\u00e9":true}"#;
        let c = Chunk::parse(data).expect("object");
        let out = c.without("usage").expect("text");
        assert_eq!(
            out,
            r#"{"id":"c\"1","choices":[ {"delta":{"content":"a\u00e9 b"}} ],"x_sent_ns":17,"zé":true}"#
        );
        // The same document as the tree gives, less `usage`.
        let mut tree: serde_json::Value = serde_json::from_str(data).expect("json");
        tree.as_object_mut().map(|o| o.remove("usage"));
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&out).expect("json"),
            tree
        );
        assert_eq!(
            Chunk::parse("{}")
                .expect("object")
                .without("usage")
                .as_deref(),
            Some("{}")
        );
    }
}

/// The fuzz target `llm_chunk`: this reader against the JSON tree it
/// replaced. Panics where they differ on a chunk the tree reads.
#[cfg(feature = "fuzzing")]
pub mod fuzz {
    use serde_json::Value;

    use super::Chunk;

    /// The texts as the tree-based metering read them (before `Chunk`).
    fn tree_texts(v: &Value) -> Vec<String> {
        let mut out = vec![];
        for c in v
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            for p in [
                "/delta/content",
                "/delta/refusal",
                "/delta/reasoning_content",
                "/text",
            ] {
                if let Some(s) = c.pointer(p).and_then(Value::as_str) {
                    out.push(s.to_owned());
                }
            }
            if let Some(calls) = c.pointer("/delta/tool_calls").and_then(Value::as_array) {
                for t in calls {
                    if let Some(s) = t.pointer("/function/arguments").and_then(Value::as_str) {
                        out.push(s.to_owned());
                    }
                }
            }
        }
        out.sort();
        out
    }

    pub fn differential(text: &str) {
        let Ok(Value::Object(mut tree)) = serde_json::from_str::<Value>(text) else {
            // Not an object the tree reads: the raw reader may accept more
            // (a number past f64's range is text to it), never less.
            return;
        };
        let chunk = Chunk::parse(text).expect("an object the tree reads is a chunk");
        let v = Value::Object(tree.clone());
        let mut texts = vec![];
        chunk.texts(|s| texts.push(s.to_owned()));
        texts.sort();
        assert_eq!(texts, tree_texts(&v), "texts of {text:?}");
        assert_eq!(
            chunk.usage(),
            v.get("usage").and_then(crate::l7::llm::usage_counts),
            "usage of {text:?}"
        );
        assert_eq!(
            chunk.no_choices(),
            v.get("choices")
                .and_then(Value::as_array)
                .is_some_and(Vec::is_empty),
            "no_choices of {text:?}"
        );
        assert_eq!(chunk.has("usage"), tree.contains_key("usage"));
        let without = chunk.without("usage").expect("text");
        tree.remove("usage");
        assert_eq!(
            serde_json::from_str::<Value>(&without).ok(),
            Some(Value::Object(tree)),
            "{text:?} less usage: {without:?}"
        );
    }
}
