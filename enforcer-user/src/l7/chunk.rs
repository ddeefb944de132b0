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
    pub fn texts(&self, mut each: impl FnMut(&str)) {
        let Some(choices) = self
            .member("choices")
            .and_then(|raw| serde_json::from_str::<Vec<&RawValue>>(raw.get()).ok())
        else {
            return;
        };
        for raw in choices {
            let Ok(choice) = serde_json::from_str::<Choice<'_>>(raw.get()) else {
                continue;
            };
            if let Some(delta) = choice
                .delta
                .and_then(|d| serde_json::from_str::<Delta<'_>>(d.get()).ok())
            {
                for text in [delta.content, delta.refusal, delta.reasoning_content]
                    .into_iter()
                    .flatten()
                {
                    if let Some(s) = string(text) {
                        each(&s);
                    }
                }
                let calls = delta
                    .tool_calls
                    .and_then(|t| serde_json::from_str::<Vec<&RawValue>>(t.get()).ok());
                for call in calls.into_iter().flatten() {
                    let arguments = serde_json::from_str::<ToolCall<'_>>(call.get())
                        .ok()
                        .and_then(|c| c.function)
                        .and_then(|f| serde_json::from_str::<Function<'_>>(f.get()).ok())
                        .and_then(|f| f.arguments)
                        .and_then(string);
                    if let Some(s) = arguments {
                        each(&s);
                    }
                }
            }
            if let Some(s) = choice.text.and_then(string) {
                each(&s);
            }
        }
    }

    /// `choices` is there and an empty array: OpenAI's usage chunk.
    pub fn no_choices(&self) -> bool {
        self.member("choices").is_some_and(|raw| {
            serde_json::from_str::<Vec<&RawValue>>(raw.get()).is_ok_and(|c| c.is_empty())
        })
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

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(borrow, default)]
    delta: Option<&'a RawValue>,
    #[serde(borrow, default)]
    text: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
    #[serde(borrow, default)]
    refusal: Option<&'a RawValue>,
    #[serde(borrow, default)]
    reasoning_content: Option<&'a RawValue>,
    #[serde(borrow, default)]
    tool_calls: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ToolCall<'a> {
    #[serde(borrow, default)]
    function: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Function<'a> {
    #[serde(borrow, default)]
    arguments: Option<&'a RawValue>,
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

    /// The texts `Chunk` reads, against those the `Value` tree gives.
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
        // The last of two `choices` is read, as a client's parser keeps it.
        assert_eq!(
            texts(r#"{"choices":[{"text":"first"}],"choices":[{"text":"last"}]}"#),
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
