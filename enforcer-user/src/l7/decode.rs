//! Bodies in content codings, decoded where the agent must read them.
//!
//! Answers: an LLM answer it meters, an MCP stream or list it filters. The
//! agent asks every such server for `Accept-Encoding: identity`; a server
//! that compresses anyway (a compressing proxy in front of it, a
//! framework's middleware that ignores the header) has its answer decoded
//! here and passed on plain, its `Content-Encoding` and `Content-Length`
//! removed — a client may always receive `identity`.
//!
//! Requests: a compressed request body that policy reads is decoded whole
//! ([`request_body`]), decided on, and forwarded decoded, so the server
//! gets the bytes policy read — never a compressed copy that a decoder of
//! its own might read otherwise. One larger than the body bound, as sent
//! or decoded, is refused (a small body can decode to gigabytes).
//!
//! Decoded: `gzip` (`x-gzip`), `deflate` (zlib, as RFC 9110 defines it),
//! `br` and `zstd`, at most [`MAX_LAYERS`] of them stacked. Anything else
//! is refused by the caller, never passed on unread. A zstd frame may ask
//! for a window of at most 8 MiB (RFC 8878 §3.1.1.1.2's limit for HTTP), so
//! a peer cannot make a decoder hold more. A stream that ends inside a
//! compressed frame, or that does not decode, fails: an answer's client
//! connection is reset, never ended as if complete; a request is refused.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use async_compression::tokio::bufread::{BrotliDecoder, GzipDecoder, ZlibDecoder, ZstdDecoder};
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt, TryStreamExt};
use http::{HeaderMap, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyDataStream, LengthLimitError, Limited};
use hyper::body::Incoming;
use tokio::io::{AsyncBufRead, AsyncRead, BufReader};
use tokio_util::io::{ReaderStream, StreamReader};

/// Codings stacked on one answer that are decoded; more are refused.
pub const MAX_LAYERS: usize = 2;

/// Decoded bytes read at a time (one frame of the plain answer at most).
const READ_CHUNK: usize = 16 * 1024;

/// log2 of the largest zstd window a frame may ask for (8 MiB).
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// A content coding the agent decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    Deflate,
    Br,
    Zstd,
}

impl Coding {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "gzip" | "x-gzip" => Some(Self::Gzip),
            "deflate" => Some(Self::Deflate),
            "br" => Some(Self::Br),
            "zstd" => Some(Self::Zstd),
            _ => None,
        }
    }
}

/// The codings of a body's `Content-Encoding` in the order they were
/// applied (`identity` left out; empty for a plain body), or, when one is
/// not decoded here or too many are stacked, their names.
pub fn codings(headers: &HeaderMap) -> Result<Vec<Coding>, String> {
    let names = super::http::content_codings(headers);
    let codings: Option<Vec<Coding>> = names.iter().map(|n| Coding::parse(n)).collect();
    match codings {
        Some(c) if c.len() <= MAX_LAYERS => Ok(c),
        _ => Err(names.join(", ")),
    }
}

/// The codings decoded here, as refusals name them.
pub const DECODED: &str = "gzip, deflate, br and zstd";

/// A server's answer as the agent reads it: as it came, or decoded.
pub enum Answer {
    Plain(Incoming),
    Decoded(Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>),
}

/// Why an answer's body failed.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error("the answer's content does not decode: {0}")]
    Decode(io::Error),
}

impl Answer {
    /// The answer to read: plain when it came plain, decoded (its
    /// `Content-Encoding` and `Content-Length` removed from `headers`) when
    /// it came in codings decoded here; `Err` with the codings' names
    /// otherwise (`headers` unchanged).
    pub fn new(headers: &mut HeaderMap, body: Incoming) -> Result<Self, String> {
        let codings = codings(headers)?;
        if codings.is_empty() {
            return Ok(Self::Plain(body));
        }
        headers.remove(header::CONTENT_ENCODING);
        headers.remove(header::CONTENT_LENGTH);
        Ok(Self::Decoded(decoded(body, &codings)))
    }
}

/// Why a compressed request body was not decoded.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    #[error("the request body is larger than {0} bytes (l7 max_body_bytes), as sent or decoded")]
    TooLarge(usize),
    #[error("the request body does not decode: {0}")]
    Unreadable(io::Error),
}

/// A request body in `codings` (in the order applied), read and decoded
/// whole; refused when more than `limit` bytes come, or would come out.
pub async fn request_body<B>(
    body: B,
    codings: &[Coding],
    limit: usize,
) -> Result<Bytes, RequestBodyError>
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut plain = decoded(Limited::new(body, limit), codings);
    let mut out = BytesMut::new();
    while let Some(chunk) = plain.next().await {
        // Decoding is work on the runtime thread: other tasks get their
        // turn when this one has used its budget, however fast input comes.
        tokio::task::consume_budget().await;
        match chunk {
            Ok(b) if out.len() + b.len() > limit => return Err(RequestBodyError::TooLarge(limit)),
            Ok(b) => out.extend_from_slice(&b),
            Err(e) if over_limit(&e) => return Err(RequestBodyError::TooLarge(limit)),
            Err(e) => return Err(RequestBodyError::Unreadable(e)),
        }
    }
    Ok(out.freeze())
}

/// Whether `e` is (or was caused by) [`Limited`]'s refusal.
fn over_limit(e: &io::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = e
        .get_ref()
        .map(|inner| inner as &(dyn std::error::Error + 'static));
    while let Some(c) = cause {
        if c.is::<LengthLimitError>() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// The data of `body` with `codings` (in the order applied) undone.
fn decoded<B>(body: B, codings: &[Coding]) -> Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let codings = codings.to_vec();
    let mut data = Box::pin(
        BodyDataStream::new(body)
            .map_err(io::Error::other)
            .try_filter(|b| std::future::ready(!b.is_empty())),
    );
    // An empty body is empty decoded (a server that names a coding on a
    // body it does not send: no compressed frame to decode); any other is
    // decoded from its first byte.
    let decoded = futures_util::stream::once(async move {
        let first = match data.try_next().await {
            Ok(Some(first)) => first,
            Ok(None) => return futures_util::stream::empty().boxed(),
            Err(e) => return futures_util::stream::once(std::future::ready(Err(e))).boxed(),
        };
        let input = futures_util::stream::once(std::future::ready(Ok(first))).chain(data);
        let input = StreamReader::new(input);
        let mut undo = codings.iter().rev();
        let Some(last) = undo.next() else {
            return ReaderStream::with_capacity(input, READ_CHUNK).boxed();
        };
        let mut out = decoder(*last, Box::pin(input));
        // Each decoder reads buffered input: the layer under it, buffered.
        for coding in undo {
            out = decoder(*coding, Box::pin(BufReader::new(out)));
        }
        ReaderStream::with_capacity(out, READ_CHUNK).boxed()
    })
    .flatten();
    Box::pin(decoded)
}

/// A decoder of `coding` reading `input`.
fn decoder(
    coding: Coding,
    input: Pin<Box<dyn AsyncBufRead + Send>>,
) -> Pin<Box<dyn AsyncRead + Send>> {
    match coding {
        Coding::Gzip => {
            let mut d = GzipDecoder::new(input);
            d.multiple_members(true);
            Box::pin(d)
        }
        Coding::Deflate => Box::pin(ZlibDecoder::new(input)),
        Coding::Br => Box::pin(BrotliDecoder::new(input)),
        Coding::Zstd => Box::pin(ZstdDecoder::with_params(
            input,
            &[async_compression::zstd::DParameter::window_log_max(
                ZSTD_WINDOW_LOG_MAX,
            )],
        )),
    }
}

impl HttpBody for Answer {
    type Data = Bytes;
    type Error = AnswerError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, AnswerError>>> {
        match self.get_mut() {
            Self::Plain(b) => Pin::new(b).poll_frame(cx).map_err(AnswerError::Http),
            Self::Decoded(s) => s
                .as_mut()
                .poll_next(cx)
                .map(|o| o.map(|r| r.map(Frame::data).map_err(AnswerError::Decode))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Plain(b) => b.is_end_stream(),
            Self::Decoded(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Plain(b) => b.size_hint(),
            Self::Decoded(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use async_compression::tokio::bufread::{BrotliEncoder, ZstdEncoder};
    use http::HeaderValue;
    use http_body_util::{Full, StreamBody};

    use super::*;

    fn headers(coding: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_str(coding).expect("value"),
        );
        h
    }

    #[test]
    fn codings_decoded_and_refused() {
        assert_eq!(codings(&HeaderMap::new()), Ok(vec![]));
        assert_eq!(codings(&headers("identity")), Ok(vec![]));
        assert_eq!(codings(&headers("GZIP")), Ok(vec![Coding::Gzip]));
        assert_eq!(codings(&headers("x-gzip")), Ok(vec![Coding::Gzip]));
        assert_eq!(
            codings(&headers("deflate, br")),
            Ok(vec![Coding::Deflate, Coding::Br])
        );
        assert_eq!(codings(&headers("zstd")), Ok(vec![Coding::Zstd]));
        assert_eq!(codings(&headers("compress")), Err("compress".into()));
        assert_eq!(codings(&headers("gzip, dcb")), Err("gzip, dcb".into()));
        assert_eq!(
            codings(&headers("gzip, gzip, gzip")),
            Err("gzip, gzip, gzip".into()),
            "more layers than decoded"
        );
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).expect("gzip");
        e.finish().expect("gzip")
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).expect("zlib");
        e.finish().expect("zlib")
    }

    /// A body of `chunks`, one frame each.
    fn body(
        chunks: Vec<Vec<u8>>,
    ) -> StreamBody<impl Stream<Item = io::Result<Frame<Bytes>>> + Send + 'static> {
        StreamBody::new(futures_util::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, io::Error>(Frame::data(Bytes::from(c)))),
        ))
    }

    /// The body's chunks, one frame each, through the decoder.
    async fn decode(chunks: Vec<Vec<u8>>, codings: &[Coding]) -> io::Result<Vec<u8>> {
        let mut s = decoded(body(chunks), codings);
        let mut out = Vec::new();
        while let Some(b) = futures_util::StreamExt::next(&mut s).await {
            out.extend_from_slice(&b?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn each_coding_and_a_stack_decode_across_chunk_boundaries() {
        let text = br#"{"usage": {"prompt_tokens": 3, "completion_tokens": 5}}"#.repeat(50);
        let split = |v: Vec<u8>| v.chunks(7).map(<[u8]>::to_vec).collect::<Vec<_>>();
        assert_eq!(
            decode(split(gzip(&text)), &[Coding::Gzip])
                .await
                .expect("gzip"),
            text
        );
        assert_eq!(
            decode(split(zlib(&text)), &[Coding::Deflate])
                .await
                .expect("zlib"),
            text
        );
        // Two gzip members, as a server that compresses each write alone.
        let mut two = gzip(&text[..100]);
        two.extend(gzip(&text[100..]));
        assert_eq!(
            decode(split(two), &[Coding::Gzip]).await.expect("members"),
            text
        );
        // `Content-Encoding: deflate, gzip`: zlib applied first, then gzip.
        let stacked = gzip(&zlib(&text));
        assert_eq!(
            decode(split(stacked), &[Coding::Deflate, Coding::Gzip])
                .await
                .expect("stack"),
            text
        );
        let br = encode(BrotliEncoder::new(&text[..])).await;
        assert_eq!(decode(split(br), &[Coding::Br]).await.expect("br"), text);
        let zst = encode(ZstdEncoder::new(&text[..])).await;
        assert_eq!(
            decode(split(zst), &[Coding::Zstd]).await.expect("zstd"),
            text
        );
    }

    async fn encode(mut e: impl tokio::io::AsyncRead + Unpin) -> Vec<u8> {
        let mut out = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut e, &mut out)
            .await
            .expect("encode");
        out
    }

    #[tokio::test]
    async fn a_cut_or_garbled_answer_fails_never_ends_as_complete() {
        let text = b"data: {\"choices\": []}\n\n".repeat(40);
        let mut cut = gzip(&text);
        cut.truncate(cut.len() - 8); // the trailer (CRC, length) gone
        assert!(decode(vec![cut], &[Coding::Gzip]).await.is_err(), "cut");
        assert!(
            decode(vec![b"not gzip at all".to_vec()], &[Coding::Gzip])
                .await
                .is_err(),
            "garbage"
        );
        assert!(
            decode(vec![b"\x1f\x8b".to_vec()], &[Coding::Gzip])
                .await
                .is_err(),
            "a header alone"
        );
    }

    #[tokio::test]
    async fn a_zstd_frame_asking_for_a_large_window_is_refused() {
        // A frame compressed with a 32 MiB window (long-distance mode)
        // asks the decoder for that much memory: refused.
        use async_compression::zstd::CParameter;
        let text = vec![b'a'; 1 << 20];
        let big = encode(ZstdEncoder::with_quality_and_params(
            &text[..],
            async_compression::Level::Default,
            &[
                CParameter::window_log(25),
                CParameter::enable_long_distance_matching(true),
            ],
        ))
        .await;
        assert!(decode(vec![big], &[Coding::Zstd]).await.is_err());
        // The same text with an 8 MiB window decodes.
        let ok = encode(ZstdEncoder::with_quality_and_params(
            &text[..],
            async_compression::Level::Default,
            &[CParameter::window_log(ZSTD_WINDOW_LOG_MAX)],
        ))
        .await;
        assert_eq!(
            decode(vec![ok], &[Coding::Zstd])
                .await
                .expect("8 MiB window"),
            text
        );
    }

    #[tokio::test]
    async fn an_empty_body_is_empty_decoded() {
        // A server that names a coding on a body it does not send (a 204,
        // a proxy's header): there is no frame to decode, and no error.
        for c in [Coding::Gzip, Coding::Deflate, Coding::Br, Coding::Zstd] {
            assert_eq!(decode(vec![], &[c]).await.expect("empty"), b"", "{c:?}");
            assert_eq!(
                decode(vec![vec![]], &[c]).await.expect("empty"),
                b"",
                "{c:?}"
            );
        }
        // One byte is a frame begun: cut, so an error.
        assert!(decode(vec![vec![0x1f]], &[Coding::Gzip]).await.is_err());
    }

    /// A request body of `chunks` through [`request_body`].
    async fn request(
        chunks: Vec<Vec<u8>>,
        codings: &[Coding],
        limit: usize,
    ) -> Result<Bytes, RequestBodyError> {
        request_body(body(chunks), codings, limit).await
    }

    #[tokio::test]
    async fn a_request_body_decodes_whole_within_the_bound() {
        let text = br#"{"model": "gpt-4o", "messages": []}"#.repeat(20);
        let split = |v: Vec<u8>| v.chunks(5).map(<[u8]>::to_vec).collect::<Vec<_>>();
        let got = request(split(gzip(&text)), &[Coding::Gzip], text.len())
            .await
            .expect("gzip at the bound");
        assert_eq!(&got[..], &text[..]);
        let got = request(
            split(gzip(&zlib(&text))),
            &[Coding::Deflate, Coding::Gzip],
            4096,
        )
        .await
        .expect("stack");
        assert_eq!(&got[..], &text[..]);
        let br = encode(BrotliEncoder::new(&text[..])).await;
        assert_eq!(
            &request(vec![br], &[Coding::Br], 4096).await.expect("br")[..],
            &text[..]
        );
        assert!(
            request(vec![], &[Coding::Zstd], 4096)
                .await
                .expect("empty")
                .is_empty()
        );
    }

    #[tokio::test]
    async fn a_request_body_over_the_bound_as_sent_or_decoded_is_refused() {
        // A bomb: 1 MiB of zeros is ~1 KiB of gzip, far under the bound as
        // sent; decoded, it passes it.
        let zeros = vec![0u8; 1 << 20];
        let bomb = gzip(&zeros);
        assert!(bomb.len() < 4096, "{}", bomb.len());
        assert!(matches!(
            request(vec![bomb], &[Coding::Gzip], 64 * 1024).await,
            Err(RequestBodyError::TooLarge(65536))
        ));
        // One byte over, decoded.
        let text = vec![b'x'; 1000];
        assert!(matches!(
            request(vec![gzip(&text)], &[Coding::Gzip], 999).await,
            Err(RequestBodyError::TooLarge(999))
        ));
        // More sent than the bound, whatever it decodes to: a stream of
        // empty gzip members costs the agent reading but yields nothing.
        let empty_members: Vec<Vec<u8>> = (0..200).map(|_| gzip(b"")).collect();
        let sent: usize = empty_members.iter().map(Vec::len).sum();
        assert!(sent > 1024);
        assert!(matches!(
            request(empty_members, &[Coding::Gzip], 1024).await,
            Err(RequestBodyError::TooLarge(1024))
        ));
    }

    #[tokio::test]
    async fn a_request_body_that_does_not_decode_is_unreadable() {
        let mut cut = gzip(b"{\"a\": 1}");
        cut.truncate(cut.len() - 4);
        for (what, body) in [("cut", cut), ("not gzip", b"{\"a\": 1}".to_vec())] {
            let e = request(vec![body], &[Coding::Gzip], 4096)
                .await
                .expect_err(what);
            assert!(matches!(e, RequestBodyError::Unreadable(_)), "{what}: {e}");
            assert!(e.to_string().contains("does not decode"), "{what}: {e}");
        }
    }

    #[tokio::test]
    async fn a_plain_answer_passes_as_it_came() {
        let body = Full::new(Bytes::from_static(b"{}"));
        let collected = decoded(body, &[])
            .try_collect::<Vec<_>>()
            .await
            .expect("plain");
        assert_eq!(collected.concat(), b"{}");
    }
}
