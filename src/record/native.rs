//! Record headers as raw bytes, through librdkafka's C API.
//!
//! Kafka header names are arbitrary bytes on the wire, but rdkafka's header accessors
//! (`BorrowedHeaders::try_get`, `get`, `iter`) unwrap `CStr::to_str` and panic on a name that
//! is not UTF-8, and `OwnedHeaders::insert` takes the name as `&str`. This module is the only
//! code in the crate allowed to use `unsafe`: it reads and writes header names and values as
//! bytes, never panics on any content, and loses nothing librdkafka keeps.
//!
//! The one thing librdkafka itself loses: its API hands out a header name as a C string, so
//! a name containing a NUL byte is read up to that byte.

use std::ffi::{c_char, c_void, CStr};

use bytes::Bytes;
use rdkafka::bindings as rd;
use rdkafka::message::{BorrowedHeaders, BorrowedMessage, OwnedHeaders};
use rdkafka::types::RDKafkaErrorCode;

/// A record header: name and value as bytes; the value may be null.
pub type RawHeader = (Bytes, Option<Bytes>);

/// Copies the headers of a consumed message, in order, duplicates kept.
///
/// Empty when the message has none. An error when librdkafka could not parse them (a record
/// with more than 100,000 headers, which librdkafka refuses).
pub fn read(msg: &BorrowedMessage<'_>) -> Result<Vec<RawHeader>, RDKafkaErrorCode> {
    let mut hdrs: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: `msg.ptr()` is the live `rd_kafka_message_t` owned by `msg` for the duration of
    // the borrow; librdkafka parses the headers on first use and keeps them in the message,
    // writing only `hdrs`. The returned list is owned by the message and is not freed by us.
    let err = unsafe { rd::rd_kafka_message_headers(msg.ptr(), &mut hdrs) };
    match RDKafkaErrorCode::from(err) {
        RDKafkaErrorCode::NoError if !hdrs.is_null() => Ok(copy_all(hdrs)),
        RDKafkaErrorCode::NoError | RDKafkaErrorCode::NoEnt => Ok(Vec::new()),
        e => Err(e),
    }
}

/// Copies every header of a header list (of a message or of [`OwnedHeaders`]).
fn copy_all(hdrs: *const rd::rd_kafka_headers_t) -> Vec<RawHeader> {
    // SAFETY: `hdrs` is a valid, non-null header list that outlives this call (callers hold
    // the message or the `OwnedHeaders` that owns it).
    let count = unsafe { rd::rd_kafka_header_cnt(hdrs) };
    let mut out = Vec::with_capacity(count);
    for idx in 0..count {
        let mut name: *const c_char = std::ptr::null();
        let mut value: *const c_void = std::ptr::null();
        let mut size: usize = 0;
        // SAFETY: as above; librdkafka only writes the three out-pointers and returns NOENT
        // for an index out of range (checked below).
        let err = unsafe { rd::rd_kafka_header_get_all(hdrs, idx, &mut name, &mut value, &mut size) };
        if RDKafkaErrorCode::from(err) != RDKafkaErrorCode::NoError || name.is_null() {
            break;
        }
        // SAFETY: librdkafka stores every header name NUL-terminated (`rd_kafka_header_add`
        // writes the terminator), and it lives as long as the header list.
        let name = Bytes::copy_from_slice(unsafe { CStr::from_ptr(name) }.to_bytes());
        let value = (!value.is_null()).then(|| {
            // SAFETY: a non-null value points to `size` bytes owned by the header list.
            Bytes::copy_from_slice(unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) })
        });
        out.push((name, value));
    }
    out
}

/// The headers of an [`OwnedHeaders`] as bytes (for tests and for reading back what we built).
pub fn owned_to_vec(headers: &OwnedHeaders) -> Vec<RawHeader> {
    copy_all(native_ptr(headers.as_borrowed()))
}

/// Appends a header with a name of any bytes (lossless, unlike `OwnedHeaders::insert`).
pub fn add(headers: OwnedHeaders, name: &[u8], value: Option<&[u8]>) -> OwnedHeaders {
    let hdrs = native_ptr(headers.as_borrowed()).cast_mut();
    // An empty value needs a valid pointer: null would make it a null header, and memcpy
    // wants a valid pointer even for 0 bytes (an empty slice's may dangle).
    let (value_ptr, value_len) = match value {
        Some([]) => (b"".as_ptr(), 0),
        Some(v) => (v.as_ptr(), v.len()),
        None => (std::ptr::null(), 0),
    };
    // SAFETY: `hdrs` is the list owned by `headers`, which we hold by value (no other
    // reference to it exists). librdkafka copies `name_size` bytes of the name and
    // `value_size` bytes of the value (both slices are valid for their lengths; a slice is
    // at most isize::MAX bytes) and never keeps the pointers. It always succeeds for a
    // writable list such as one created by `OwnedHeaders::new`.
    unsafe {
        rd::rd_kafka_header_add(
            hdrs,
            name.as_ptr().cast::<c_char>(),
            name.len() as isize,
            value_ptr.cast::<c_void>(),
            value_len as isize,
        );
    }
    headers
}

/// The librdkafka header list behind a `BorrowedHeaders` reference.
///
/// rdkafka 0.39 represents `BorrowedHeaders` as a zero-sized type whose address is the
/// `rd_kafka_headers_t` pointer (`OwnedHeaders::as_borrowed` casts the pointer to the
/// reference). The round-trip test below fails if a future rdkafka changes that.
fn native_ptr(headers: &BorrowedHeaders) -> *const rd::rd_kafka_headers_t {
    (headers as *const BorrowedHeaders).cast()
}

#[cfg(test)]
mod tests {
    use rdkafka::message::{Header, Headers};

    use super::*;

    #[test]
    fn names_of_any_bytes_values_empty_and_null_survive_a_round_trip() {
        let headers: Vec<(&[u8], Option<&[u8]>)> = vec![
            (b"\xff\xfe", Some(b"v")),
            (b"", Some(b"empty name")),
            (b"empty value", Some(b"")),
            (b"null value", None),
            ("héader".as_bytes(), Some(&[0, 1, 255])),
        ];
        let mut owned = OwnedHeaders::new();
        for (name, value) in &headers {
            owned = add(owned, name, *value);
        }
        let back = owned_to_vec(&owned);
        let back: Vec<(&[u8], Option<&[u8]>)> = back.iter().map(|(n, v)| (&n[..], v.as_deref())).collect();
        assert_eq!(back, headers);
        assert_eq!(owned.count(), headers.len(), "rdkafka sees the same list");
    }

    #[test]
    fn headers_inserted_through_rdkafka_read_back_the_same() {
        let owned = OwnedHeaders::new().insert(Header {
            key: "traceparent",
            value: Some("00-abc"),
        });
        let owned = add(owned, b"raw", None);
        let back = owned_to_vec(&owned);
        assert_eq!(
            back,
            vec![
                (Bytes::from_static(b"traceparent"), Some(Bytes::from_static(b"00-abc"))),
                (Bytes::from_static(b"raw"), None)
            ]
        );
    }

    #[test]
    fn a_name_with_a_nul_byte_is_read_up_to_it() {
        let back = owned_to_vec(&add(OwnedHeaders::new(), b"a\0b", Some(b"v")));
        assert_eq!(back, vec![(Bytes::from_static(b"a"), Some(Bytes::from_static(b"v")))]);
    }
}
