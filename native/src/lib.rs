//! Native core of the presence gateway: slot hashing, write tags, RESP packing and parsing, and
//! per-shard write batches. The pure modules have no Python dependency; the `python` feature adds
//! the pyo3 glue that maturin builds as `gateway._native`.

pub mod batch;
pub mod frames;
pub mod hashing;
pub mod resp;
pub mod slots;
pub mod subscribe;
pub mod tag;

#[cfg(feature = "python")]
mod glue {
    //! pyo3 glue only: argument conversion, Python classes and exceptions; no algorithms.

    use crate::batch::{self, CallReply, Op};
    use crate::resp::{self, Builder, Cursor, Decimal, ErrorKind, FeedError, Parser};
    use crate::subscribe::{self, ClientFrame, SubscribeLimits};
    use crate::{frames, hashing, slots, tag};
    use pyo3::create_exception;
    use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
    use pyo3::prelude::*;
    use pyo3::types::{PyBool, PyBytes, PyDict, PyInt, PyList, PyString, PyTuple};

    create_exception!(
        gateway._native,
        RespError,
        PyValueError,
        "Malformed RESP, or replies whose shape does not match the batch."
    );

    /// An error reply from Redis. `code` is its first word, `args[0]` the full message.
    #[pyclass(extends = PyRuntimeError, subclass, module = "gateway._native")]
    pub struct ReplyError;

    #[pymethods]
    impl ReplyError {
        #[new]
        #[pyo3(signature = (*args, **kwargs))]
        fn new(args: &Bound<'_, PyTuple>, kwargs: Option<&Bound<'_, PyDict>>) -> Self {
            // BaseException.__init__ stores the arguments as `args` (and refuses keywords).
            let _ = (args, kwargs);
            Self
        }

        /// The error code: the first word of the message (e.g. `WRONGSHARD`).
        #[getter]
        fn code(slf: &Bound<'_, Self>) -> PyResult<String> {
            let args = slf.getattr("args")?;
            let args = args.cast::<PyTuple>()?;
            if args.is_empty() {
                return Ok(String::new());
            }
            let first = args.get_item(0)?;
            let message = match first.cast::<PyString>() {
                Ok(s) => s.to_cow()?.into_owned(),
                Err(_) => first.str()?.to_cow()?.into_owned(),
            };
            Ok(String::from_utf8_lossy(resp::error_code(message.as_bytes())).into_owned())
        }
    }

    /// A subclass of `ReplyError` (constructed like it: the message is the first argument).
    macro_rules! reply_error {
        ($name:ident, $doc:literal) => {
            #[doc = $doc]
            #[pyclass(extends = ReplyError, subclass, module = "gateway._native")]
            pub struct $name;

            #[pymethods]
            impl $name {
                #[new]
                #[pyo3(signature = (*args, **kwargs))]
                fn new(
                    args: &Bound<'_, PyTuple>,
                    kwargs: Option<&Bound<'_, PyDict>>,
                ) -> PyClassInitializer<Self> {
                    let _ = (args, kwargs);
                    PyClassInitializer::from(ReplyError).add_subclass(Self)
                }
            }
        };
    }

    reply_error!(
        RoutingError,
        "The write reached a server that must not apply it; safe to retry after rediscovery."
    );

    /// A subclass of a `ReplyError` subclass made by `reply_error!`.
    macro_rules! leaf_error {
        ($name:ident, $base:ident, $doc:literal) => {
            #[doc = $doc]
            #[pyclass(extends = $base, subclass, module = "gateway._native")]
            pub struct $name;

            #[pymethods]
            impl $name {
                #[new]
                #[pyo3(signature = (*args, **kwargs))]
                fn new(
                    args: &Bound<'_, PyTuple>,
                    kwargs: Option<&Bound<'_, PyDict>>,
                ) -> PyClassInitializer<Self> {
                    $base::new(args, kwargs).add_subclass(Self)
                }
            }
        };
    }

    leaf_error!(
        WrongShardError,
        RoutingError,
        "`WRONGSHARD`: the server is another shard."
    );
    leaf_error!(
        StaleEpochError,
        RoutingError,
        "`STALEEPOCH`: the topology was re-initialised."
    );
    leaf_error!(
        NoIdentityError,
        RoutingError,
        "`NOIDENTITY`: the server is not an initialised shard."
    );
    leaf_error!(
        ReadOnlyError,
        RoutingError,
        "`READONLY`: the server is a replica."
    );

    reply_error!(
        BadTagError,
        "`BADTAG`: the write tag does not match the key."
    );
    reply_error!(
        BadOpError,
        "`BADOP`: unknown operation or wrong argument count."
    );

    fn type_name(obj: &Bound<'_, PyAny>) -> String {
        obj.get_type()
            .name()
            .map_or_else(|_| "?".to_owned(), |n| n.to_string())
    }

    /// An `int` argument (not `bool`) that fits in an `i64`.
    fn int_arg(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<i64> {
        if obj.is_instance_of::<PyBool>() || !obj.is_instance_of::<PyInt>() {
            return Err(PyTypeError::new_err(format!(
                "{what} must be an int, not {}",
                type_name(obj)
            )));
        }
        obj.extract::<i64>()
            .map_err(|_| PyValueError::new_err(format!("{what} is out of range")))
    }

    fn epoch_arg(obj: &Bound<'_, PyAny>) -> PyResult<u64> {
        let epoch = int_arg(obj, "epoch")?;
        if epoch < 1 {
            return Err(PyValueError::new_err(format!(
                "epoch must be >= 1, got {epoch}"
            )));
        }
        Ok(epoch as u64)
    }

    fn reject_str_like(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<()> {
        if obj.is_instance_of::<PyBytes>() || obj.is_instance_of::<PyString>() {
            return Err(PyTypeError::new_err(format!(
                "{what} must be a sequence of arguments, not {}",
                type_name(obj)
            )));
        }
        Ok(())
    }

    /// The Redis Cluster slot of `key`; equals `CLUSTER KEYSLOT`.
    #[pyfunction]
    fn key_slot(key: &[u8]) -> u16 {
        hashing::key_slot(key)
    }

    /// The write tag of `key` for the shard identity `(uuid, epoch)`: 16 lowercase hex digits of
    /// `sha1(uuid ":" epoch ":" key)`.
    #[pyfunction]
    #[pyo3(signature = (uuid, epoch, key))]
    fn write_tag(uuid: &str, epoch: &Bound<'_, PyAny>, key: &[u8]) -> PyResult<String> {
        let tag = tag::write_tag(uuid.as_bytes(), epoch_arg(epoch)?, key);
        Ok(String::from_utf8_lossy(&tag).into_owned())
    }

    /// A client frame the fast path understood: `(channel, user_id, user_info)` of a signed
    /// `pusher:subscribe` frame to a presence channel with `channel_data`, the channel (a
    /// `str`) of a `pusher:unsubscribe`, or `None` when `gateway.protocol` must decide (see
    /// `subscribe.rs`). Never raises on `text`.
    #[pyfunction]
    #[pyo3(signature = (
        text, socket_id, key, secret, *, max_frame_bytes, max_channel_name_length,
        max_user_id_length, max_user_info_bytes
    ))]
    #[allow(clippy::too_many_arguments)]
    fn client_frame<'py>(
        py: Python<'py>,
        text: &Bound<'py, PyString>,
        socket_id: &str,
        key: &str,
        secret: &str,
        max_frame_bytes: usize,
        max_channel_name_length: usize,
        max_user_id_length: usize,
        max_user_info_bytes: usize,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        // A str with lone surrogates has no UTF-8 form: the reference refuses it.
        let Ok(text) = text.to_str() else {
            return Ok(None);
        };
        let limits = SubscribeLimits {
            max_frame_bytes,
            max_channel_name_length,
            max_user_id_length,
            max_user_info_bytes,
        };
        Ok(
            match subscribe::client_frame(text, socket_id, key, secret.as_bytes(), &limits) {
                Some(ClientFrame::Subscribe(m)) => Some(
                    (m.channel, m.user_id, m.user_info)
                        .into_pyobject(py)?
                        .into_any(),
                ),
                Some(ClientFrame::Unsubscribe(channel)) => {
                    Some(PyString::new(py, &channel).into_any())
                }
                None => None,
            },
        )
    }

    /// The `subscription_succeeded` frame of a presence channel from the flat roster of a join
    /// reply (a list of `bytes`), with the joining member added if missing; `None` when the
    /// reference must build it (see `frames.rs`).
    #[pyfunction]
    #[pyo3(signature = (channel, flat, user_id, user_info))]
    fn presence_succeeded(
        channel: &Bound<'_, PyString>,
        flat: &Bound<'_, PyAny>,
        user_id: &Bound<'_, PyString>,
        user_info: Option<&Bound<'_, PyString>>,
    ) -> Option<String> {
        let items = flat.cast::<PyList>().ok()?;
        let items: Vec<Bound<'_, PyBytes>> = items
            .iter()
            .map(|item| item.cast_into::<PyBytes>().ok())
            .collect::<Option<_>>()?;
        let flat: Vec<&[u8]> = items.iter().map(PyBytesMethods::as_bytes).collect();
        let info = match user_info {
            Some(info) => Some(info.to_str().ok()?),
            None => None,
        };
        frames::presence_succeeded(channel.to_str().ok()?, &flat, user_id.to_str().ok()?, info)
    }

    /// The frame of a `member_added` (`M`) or `member_removed` (`R`) Pub/Sub message for
    /// `channel`, and the socket id it must not go to; `None` for anything else (see
    /// `frames.rs`).
    #[pyfunction]
    #[pyo3(signature = (channel, message))]
    fn member_frame(
        channel: &Bound<'_, PyString>,
        message: &[u8],
    ) -> Option<(String, Option<String>)> {
        frames::member_frame(channel.to_str().ok()?, message)
    }

    /// Packs one command as a RESP2 array of bulk strings (`str` as UTF-8, `int` in decimal).
    #[pyfunction]
    #[pyo3(signature = (args))]
    fn pack_command<'py>(
        py: Python<'py>,
        args: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        reject_str_like(args, "args")?;
        let n = args.len()?;
        let mut out = Vec::with_capacity(16 + 32 * n);
        resp::push_array_header(&mut out, n);
        let mut seen = 0usize;
        for (i, item) in args.try_iter()?.enumerate() {
            let item = item?;
            if let Ok(b) = item.cast::<PyBytes>() {
                resp::push_bulk(&mut out, b.as_bytes());
            } else if let Ok(s) = item.cast::<PyString>() {
                resp::push_bulk(&mut out, s.to_str()?.as_bytes());
            } else if item.is_instance_of::<PyInt>() && !item.is_instance_of::<PyBool>() {
                if let Ok(v) = item.extract::<i64>() {
                    resp::push_bulk(&mut out, Decimal::signed(v).as_bytes());
                } else {
                    resp::push_bulk(&mut out, item.str()?.to_str()?.as_bytes());
                }
            } else {
                return Err(PyTypeError::new_err(format!(
                    "args[{i}] must be bytes, str or int, not {}",
                    type_name(&item)
                )));
            }
            seen += 1;
        }
        if seen != n {
            return Err(PyValueError::new_err("args changed length while packing"));
        }
        Ok(PyBytes::new(py, &out))
    }

    /// Which shard owns each slot, and each shard's identity, under one topology epoch.
    #[pyclass(frozen, name = "SlotTable", module = "gateway._native")]
    pub struct PySlotTable {
        inner: slots::SlotTable,
    }

    fn table_err(e: &slots::TableError) -> PyErr {
        PyValueError::new_err(e.0.clone())
    }

    fn uuids_arg(uuids: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
        if uuids.is_instance_of::<PyString>() {
            return Err(PyTypeError::new_err(
                "uuids must be a sequence of str, not str",
            ));
        }
        uuids.extract()
    }

    #[pymethods]
    impl PySlotTable {
        #[new]
        #[pyo3(signature = (epoch, uuids, ranges))]
        fn new(
            epoch: &Bound<'_, PyAny>,
            uuids: &Bound<'_, PyAny>,
            ranges: &Bound<'_, PyAny>,
        ) -> PyResult<Self> {
            let epoch = epoch_arg(epoch)?;
            let uuids = uuids_arg(uuids)?;
            let raw: Vec<(Bound<'_, PyAny>, Bound<'_, PyAny>)> = ranges.extract()?;
            let ranges = raw
                .iter()
                .enumerate()
                .map(|(i, (s, e))| {
                    Ok((
                        int_arg(s, &format!("start of range {i}"))?,
                        int_arg(e, &format!("end of range {i}"))?,
                    ))
                })
                .collect::<PyResult<Vec<_>>>()?;
            let inner =
                slots::SlotTable::new(epoch as i64, uuids, &ranges).map_err(|e| table_err(&e))?;
            Ok(Self { inner })
        }

        /// A table splitting the slots evenly over `len(uuids)` shards.
        #[staticmethod]
        #[pyo3(signature = (epoch, uuids))]
        fn even(epoch: &Bound<'_, PyAny>, uuids: &Bound<'_, PyAny>) -> PyResult<Self> {
            let epoch = epoch_arg(epoch)?;
            let uuids = uuids_arg(uuids)?;
            let inner = slots::SlotTable::even(epoch as i64, uuids).map_err(|e| table_err(&e))?;
            Ok(Self { inner })
        }

        /// The even split of the slots over `n` shards, as inclusive ranges.
        #[staticmethod]
        #[pyo3(signature = (n))]
        fn even_ranges(n: &Bound<'_, PyAny>) -> PyResult<Vec<(u16, u16)>> {
            let n = int_arg(n, "n")?;
            let n = usize::try_from(n).map_err(|_| {
                PyValueError::new_err(format!("number of shards must be >= 1, got {n}"))
            })?;
            slots::even_ranges(n).map_err(|e| table_err(&e))
        }

        /// The topology epoch.
        #[getter]
        fn epoch(&self) -> u64 {
            self.inner.epoch()
        }

        /// Number of shards.
        #[getter]
        fn num_shards(&self) -> usize {
            self.inner.num_shards()
        }

        /// The uuid of `shard`.
        #[pyo3(signature = (shard))]
        fn uuid(&self, shard: &Bound<'_, PyAny>) -> PyResult<String> {
            let i = int_arg(shard, "shard")?;
            usize::try_from(i)
                .ok()
                .and_then(|s| self.inner.uuid(s))
                .map(str::to_owned)
                .ok_or_else(|| {
                    PyValueError::new_err(format!(
                        "shard {i} out of range (table has {} shards)",
                        self.inner.num_shards()
                    ))
                })
        }

        /// The shard owning `slot` (0..16383).
        #[pyo3(signature = (slot))]
        fn shard_of_slot(&self, slot: &Bound<'_, PyAny>) -> PyResult<usize> {
            let s = int_arg(slot, "slot")?;
            usize::try_from(s)
                .ok()
                .and_then(|s| self.inner.shard_of_slot(s))
                .ok_or_else(|| PyValueError::new_err(format!("slot {s} out of range 0..16383")))
        }

        /// The shard owning `key`'s slot.
        #[pyo3(signature = (key))]
        fn shard_for_key(&self, key: &[u8]) -> usize {
            self.inner.shard_for_key(key)
        }

        fn __repr__(&self) -> String {
            format!(
                "SlotTable(epoch={}, num_shards={})",
                self.inner.epoch(),
                self.inner.num_shards()
            )
        }
    }

    /// One shard's pipeline of `FCALL pg_apply` commands and the plan mapping replies to ops.
    #[pyclass(frozen, name = "ShardBatch", module = "gateway._native")]
    pub struct PyShardBatch {
        shard: usize,
        payload: Py<PyBytes>,
        op_indices: Vec<usize>,
        calls: Vec<usize>,
    }

    #[pymethods]
    impl PyShardBatch {
        /// Index of the shard in the slot table.
        #[getter]
        fn shard(&self) -> usize {
            self.shard
        }

        /// The packed commands, to write to the shard's connection as they are.
        #[getter]
        fn payload(&self, py: Python<'_>) -> Py<PyBytes> {
            self.payload.clone_ref(py)
        }

        /// Indices into the input ops, in the order of their replies.
        #[getter]
        fn op_indices(&self) -> Vec<usize> {
            self.op_indices.clone()
        }

        /// Number of `FCALL` commands in the payload (= number of replies to read).
        #[getter]
        fn n_commands(&self) -> usize {
            self.calls.len()
        }

        /// One result per op (aligned with `op_indices`) from the `n_commands` replies.
        #[pyo3(signature = (replies))]
        fn map_replies(
            &self,
            py: Python<'_>,
            replies: &Bound<'_, PyAny>,
        ) -> PyResult<Vec<Py<PyAny>>> {
            let n = replies.len()?;
            if n != self.calls.len() {
                return Err(RespError::new_err(format!(
                    "expected {} replies, got {n}",
                    self.calls.len()
                )));
            }
            let mut shaped = Vec::with_capacity(n);
            for (i, reply) in replies.try_iter()?.enumerate() {
                let reply = reply?;
                if reply.is_instance_of::<ReplyError>() {
                    shaped.push(CallReply::Error(reply.unbind()));
                } else if let Ok(list) = reply.cast::<PyList>() {
                    shaped.push(CallReply::Array(list.iter().map(Bound::unbind).collect()));
                } else {
                    return Err(RespError::new_err(format!(
                        "reply {i} is neither an array nor an error reply: {}",
                        type_name(&reply)
                    )));
                }
            }
            batch::map_replies(&self.calls, shaped, |v| v.clone_ref(py))
                .map_err(|e| RespError::new_err(e.0))
        }

        fn __repr__(&self) -> String {
            format!(
                "ShardBatch(shard={}, ops={}, n_commands={})",
                self.shard,
                self.op_indices.len(),
                self.calls.len()
            )
        }
    }

    /// A `bytes` argument whose buffer Rust borrows while it holds the reference.
    struct BytesArg<'py>(Bound<'py, PyBytes>);

    impl AsRef<[u8]> for BytesArg<'_> {
        #[inline]
        fn as_ref(&self) -> &[u8] {
            self.0.as_bytes()
        }
    }

    fn bytes_item<'py>(
        item: Borrowed<'_, 'py, PyAny>,
        what: &dyn Fn() -> String,
    ) -> PyResult<BytesArg<'py>> {
        match item.cast::<PyBytes>() {
            Ok(b) => Ok(BytesArg(b.to_owned())),
            Err(_) => Err(PyTypeError::new_err(format!(
                "{} must be bytes, not {}",
                what(),
                type_name(&item)
            ))),
        }
    }

    /// Appends the bytes of `ops[i]` (op, key, args...) to `objs`; returns the argument count.
    fn extract_op<'py>(
        i: usize,
        item: &Bound<'py, PyAny>,
        objs: &mut Vec<BytesArg<'py>>,
    ) -> PyResult<usize> {
        let tuple = match item.cast::<PyTuple>() {
            Ok(t) if t.len() == 3 => t,
            _ => {
                return Err(PyTypeError::new_err(format!(
                    "ops[{i}] must be a tuple (op, key, args), not {}",
                    type_name(item)
                )))
            }
        };
        objs.push(bytes_item(tuple.get_borrowed_item(0)?, &|| {
            format!("ops[{i}] op")
        })?);
        objs.push(bytes_item(tuple.get_borrowed_item(1)?, &|| {
            format!("ops[{i}] key")
        })?);
        let args = tuple.get_borrowed_item(2)?;
        let what = |j: usize| move || format!("ops[{i}] args[{j}]");
        if let Ok(t) = args.cast::<PyTuple>() {
            for (j, a) in t.iter_borrowed().enumerate() {
                objs.push(bytes_item(a, &what(j))?);
            }
            Ok(t.len())
        } else if let Ok(l) = args.cast::<PyList>() {
            let mut n = 0;
            for (j, a) in l.iter().enumerate() {
                objs.push(bytes_item(a.as_borrowed(), &what(j))?);
                n += 1;
            }
            Ok(n)
        } else {
            let args = args.to_owned();
            reject_str_like(&args, &format!("ops[{i}] args"))?;
            let mut n = 0;
            for (j, a) in args.try_iter()?.enumerate() {
                objs.push(bytes_item(a?.as_borrowed(), &what(j))?);
                n += 1;
            }
            Ok(n)
        }
    }

    /// Groups `ops` (`(op, key, args)` tuples) by shard and packs each shard's ops into
    /// `FCALL pg_apply` commands of at most `group` ops; one batch per shard with ops.
    #[pyfunction]
    #[pyo3(signature = (table, ops, *, group = 128))]
    fn build_batches(
        py: Python<'_>,
        table: &Bound<'_, PySlotTable>,
        ops: &Bound<'_, PyAny>,
        group: i64,
    ) -> PyResult<Vec<PyShardBatch>> {
        if group < 1 {
            return Err(PyValueError::new_err(format!(
                "group must be >= 1, got {group}"
            )));
        }
        let group = usize::try_from(group).unwrap_or(usize::MAX);
        reject_str_like(ops, "ops")?;
        let n = ops.len()?;
        // Owned references keep every bytes object alive while Rust borrows its buffer.
        let mut objs: Vec<BytesArg<'_>> = Vec::with_capacity(n * 5);
        let mut meta: Vec<(usize, usize)> = Vec::with_capacity(n);
        if let Ok(list) = ops.cast::<PyList>() {
            for (i, item) in list.iter().enumerate() {
                let start = objs.len();
                meta.push((start, extract_op(i, &item, &mut objs)?));
            }
        } else {
            for (i, item) in ops.try_iter()?.enumerate() {
                let start = objs.len();
                meta.push((start, extract_op(i, &item?, &mut objs)?));
            }
        }
        let ops: Vec<Op<'_, BytesArg<'_>>> = meta
            .iter()
            .map(|&(s, argc)| Op {
                name: objs[s].as_ref(),
                key: objs[s + 1].as_ref(),
                args: &objs[s + 2..s + 2 + argc],
            })
            .collect();
        let table = &table.get().inner;
        batch::plan_batches(table, &ops, group)
            .into_iter()
            .map(|plan| {
                // The payload is written once, straight into the bytes object.
                let payload = PyBytes::new_with(py, plan.payload_len, |buf| {
                    let mut cursor = Cursor::new(buf);
                    batch::write_payload(table, &plan, &ops, &mut cursor);
                    if cursor.position() == plan.payload_len {
                        Ok(())
                    } else {
                        Err(PyRuntimeError::new_err(
                            "internal error: payload size mismatch",
                        ))
                    }
                })?;
                Ok(PyShardBatch {
                    shard: plan.shard,
                    payload: payload.unbind(),
                    op_indices: plan.op_indices,
                    calls: plan.calls,
                })
            })
            .collect()
    }

    /// Builds Python objects straight from the parser.
    struct PyBuilder<'py> {
        py: Python<'py>,
    }

    impl Builder for PyBuilder<'_> {
        type Value = Py<PyAny>;
        type Error = PyErr;

        fn simple(&mut self, line: &[u8]) -> PyResult<Py<PyAny>> {
            Ok(PyString::new(self.py, &String::from_utf8_lossy(line))
                .into_any()
                .unbind())
        }

        fn error(&mut self, line: &[u8]) -> PyResult<Py<PyAny>> {
            let py = self.py;
            let message = String::from_utf8_lossy(line);
            let ty = match ErrorKind::of(line) {
                ErrorKind::WrongShard => py.get_type::<WrongShardError>(),
                ErrorKind::StaleEpoch => py.get_type::<StaleEpochError>(),
                ErrorKind::NoIdentity => py.get_type::<NoIdentityError>(),
                ErrorKind::ReadOnly => py.get_type::<ReadOnlyError>(),
                ErrorKind::BadTag => py.get_type::<BadTagError>(),
                ErrorKind::BadOp => py.get_type::<BadOpError>(),
                ErrorKind::Other => py.get_type::<ReplyError>(),
            };
            Ok(ty.call1((message,))?.unbind())
        }

        fn integer(&mut self, n: i64) -> PyResult<Py<PyAny>> {
            Ok(n.into_pyobject(self.py)?.into_any().unbind())
        }

        fn bulk(&mut self, data: &[u8]) -> PyResult<Py<PyAny>> {
            Ok(PyBytes::new(self.py, data).into_any().unbind())
        }

        fn null(&mut self) -> PyResult<Py<PyAny>> {
            Ok(self.py.None())
        }

        fn array(&mut self, items: Vec<Py<PyAny>>) -> PyResult<Py<PyAny>> {
            Ok(PyList::new(self.py, items)?.into_any().unbind())
        }
    }

    /// Incremental RESP2 reply parser: `feed` bytes as they arrive, `take` complete replies.
    #[pyclass(name = "ReplyReader", module = "gateway._native")]
    pub struct PyReplyReader {
        parser: Parser<Py<PyAny>>,
    }

    impl PyReplyReader {
        fn check(&self) -> PyResult<()> {
            if self.parser.is_poisoned() {
                return Err(RespError::new_err(resp::POISONED));
            }
            Ok(())
        }
    }

    #[pymethods]
    impl PyReplyReader {
        #[new]
        fn new() -> Self {
            Self {
                parser: Parser::new(),
            }
        }

        /// Parses `data`; raises `RespError` on malformed input (the reader is then unusable).
        #[pyo3(signature = (data))]
        fn feed(&mut self, py: Python<'_>, data: &[u8]) -> PyResult<()> {
            self.parser
                .feed(data, &mut PyBuilder { py })
                .map_err(|e| match e {
                    FeedError::Malformed(m) => RespError::new_err(m),
                    FeedError::Build(err) => err,
                })
        }

        /// Number of complete replies waiting.
        fn available(&self) -> PyResult<usize> {
            self.check()?;
            Ok(self.parser.available())
        }

        /// Removes and returns exactly `n` replies, or `None` (consuming nothing) if fewer wait.
        #[pyo3(signature = (n))]
        fn take(&mut self, n: &Bound<'_, PyAny>) -> PyResult<Option<Vec<Py<PyAny>>>> {
            self.check()?;
            let n = int_arg(n, "n")?;
            let n = usize::try_from(n)
                .map_err(|_| PyValueError::new_err(format!("n must be >= 0, got {n}")))?;
            Ok(self.parser.take(n))
        }
    }

    /// The `gateway._native` module.
    #[pymodule]
    #[pyo3(name = "_native")]
    fn native_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
        let py = m.py();
        m.add_function(wrap_pyfunction!(key_slot, m)?)?;
        m.add_function(wrap_pyfunction!(write_tag, m)?)?;
        m.add_function(wrap_pyfunction!(pack_command, m)?)?;
        m.add_function(wrap_pyfunction!(build_batches, m)?)?;
        m.add_function(wrap_pyfunction!(client_frame, m)?)?;
        m.add_function(wrap_pyfunction!(presence_succeeded, m)?)?;
        m.add_function(wrap_pyfunction!(member_frame, m)?)?;
        m.add_class::<PySlotTable>()?;
        m.add_class::<PyShardBatch>()?;
        m.add_class::<PyReplyReader>()?;
        m.add("RespError", py.get_type::<RespError>())?;
        m.add_class::<ReplyError>()?;
        m.add_class::<RoutingError>()?;
        m.add_class::<WrongShardError>()?;
        m.add_class::<StaleEpochError>()?;
        m.add_class::<NoIdentityError>()?;
        m.add_class::<ReadOnlyError>()?;
        m.add_class::<BadTagError>()?;
        m.add_class::<BadOpError>()?;
        Ok(())
    }
}
