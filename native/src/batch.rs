//! Per-shard write batches: grouping operations by shard into pipelines of `FCALL pg_apply`, and
//! mapping the replies of those calls back to the operations.

use crate::resp::{
    array_header_size, bulk_size, bulk_uint_size, push_array_header, push_bulk, push_bulk_uint,
    Sink,
};
use crate::slots::SlotTable;
use crate::tag::{Tagger, TAG_LEN};
use std::fmt;

/// The function every batch calls.
const FCALL_PREFIX: &[u8] = b"$5\r\nFCALL\r\n$8\r\npg_apply\r\n";

/// Fixed elements of one call besides its operations: `FCALL`, `pg_apply`, `numkeys`, uuid, epoch.
const FIXED_ELEMENTS: usize = 5;

/// One write operation: its op name, its key and its arguments.
///
/// `A` is whatever holds an argument's bytes, so callers can lend their own buffers (such as
/// Python `bytes` objects) without collecting slices first.
#[derive(Debug)]
pub struct Op<'a, A = &'a [u8]> {
    /// The op name (`hset`, `hdel`, ...), case-sensitive.
    pub name: &'a [u8],
    /// The key the operation writes; it decides the shard.
    pub key: &'a [u8],
    /// The op's arguments, sent after its argument count.
    pub args: &'a [A],
}

impl<A> Clone for Op<'_, A> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<A> Copy for Op<'_, A> {}

/// The pipeline for one shard, packed into a `Vec` (see [`plan_batches`] to pack in place).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Index of the shard in the slot table.
    pub shard: usize,
    /// The packed `FCALL` commands, ready to write to the shard's socket.
    pub payload: Vec<u8>,
    /// Indices into the input operations, in the order their replies come back.
    pub op_indices: Vec<usize>,
    /// Number of operations in each `FCALL`, in order.
    pub calls: Vec<usize>,
}

/// Everything about one shard's pipeline except its bytes: which ops, how they split into
/// calls, and the exact payload size, so the caller can allocate the payload once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Index of the shard in the slot table.
    pub shard: usize,
    /// Indices into the input operations, in the order their replies come back.
    pub op_indices: Vec<usize>,
    /// Number of operations in each `FCALL`, in order.
    pub calls: Vec<usize>,
    /// Exact size in bytes of the payload [`write_payload`] writes.
    pub payload_len: usize,
}

/// Bytes of one operation's own part of a call (its key, op name, tag, argc and args).
#[inline]
fn op_size<A: AsRef<[u8]>>(op: &Op<'_, A>) -> usize {
    bulk_size(op.key.len())
        + bulk_size(op.name.len())
        + bulk_size(TAG_LEN)
        + bulk_uint_size(op.args.len() as u64)
        + op.args
            .iter()
            .map(|a| bulk_size(a.as_ref().len()))
            .sum::<usize>()
}

/// Groups `ops` by shard (keeping their order within a shard) and splits each shard's operations
/// into `FCALL pg_apply` calls of at most `group` operations. One plan per shard that has
/// operations, ordered by shard index.
///
/// # Panics
///
/// If `group` is 0.
pub fn plan_batches<A: AsRef<[u8]>>(
    table: &SlotTable,
    ops: &[Op<'_, A>],
    group: usize,
) -> Vec<Plan> {
    assert!(group >= 1, "group must be >= 1");
    let n_shards = table.num_shards();
    let mut sizes = Vec::with_capacity(ops.len());
    let mut per_shard: Vec<Vec<usize>> = if n_shards == 1 {
        sizes.extend(ops.iter().map(op_size));
        vec![(0..ops.len()).collect()]
    } else {
        let shard_of: Vec<usize> = ops
            .iter()
            .map(|op| {
                sizes.push(op_size(op));
                table.shard_for_key(op.key)
            })
            .collect();
        let mut counts = vec![0usize; n_shards];
        for &s in &shard_of {
            counts[s] += 1;
        }
        let mut per: Vec<Vec<usize>> = counts.iter().map(|&c| Vec::with_capacity(c)).collect();
        for (i, &s) in shard_of.iter().enumerate() {
            per[s].push(i);
        }
        per
    };
    let mut plans = Vec::new();
    for (shard, indices) in per_shard.iter_mut().enumerate() {
        if indices.is_empty() {
            continue;
        }
        let indices = std::mem::take(indices);
        let uuid_len = table.uuid(shard).unwrap_or_default().len();
        let fixed = FCALL_PREFIX.len() + bulk_size(uuid_len) + bulk_size(table.epoch_text().len());
        let mut calls = Vec::with_capacity(indices.len().div_ceil(group));
        let mut payload_len = 0;
        for chunk in indices.chunks(group) {
            let n = chunk.len();
            let n_args: usize = chunk.iter().map(|&i| ops[i].args.len()).sum();
            payload_len += array_header_size(FIXED_ELEMENTS + 4 * n + n_args)
                + fixed
                + bulk_uint_size(n as u64)
                + chunk.iter().map(|&i| sizes[i]).sum::<usize>();
            calls.push(n);
        }
        plans.push(Plan {
            shard,
            op_indices: indices,
            calls,
            payload_len,
        });
    }
    plans
}

/// Writes the payload of `plan` (made by [`plan_batches`] from the same `table` and `ops`):
/// per call `FCALL pg_apply <n> <keys…> <uuid> <epoch>` then `<op> <tag> <argc> <args…>` per op.
///
/// # Panics
///
/// If `out` is shorter than `plan.payload_len`.
pub fn write_payload<S: Sink, A: AsRef<[u8]>>(
    table: &SlotTable,
    plan: &Plan,
    ops: &[Op<'_, A>],
    out: &mut S,
) {
    let uuid = table.uuid(plan.shard).unwrap_or_default().as_bytes();
    let epoch = table.epoch_text();
    let tagger = Tagger::new(uuid, table.epoch());
    let mut rest = &plan.op_indices[..];
    for &n in &plan.calls {
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        let n_args: usize = chunk.iter().map(|&i| ops[i].args.len()).sum();
        push_array_header(out, FIXED_ELEMENTS + 4 * n + n_args);
        out.put(FCALL_PREFIX);
        push_bulk_uint(out, n as u64);
        for &i in chunk {
            push_bulk(out, ops[i].key);
        }
        push_bulk(out, uuid);
        push_bulk(out, epoch);
        for &i in chunk {
            let op = ops[i];
            push_bulk(out, op.name);
            push_bulk(out, &tagger.tag(op.key));
            push_bulk_uint(out, op.args.len() as u64);
            for arg in op.args {
                push_bulk(out, arg.as_ref());
            }
        }
    }
}

/// [`plan_batches`] and [`write_payload`] into one `Vec` per shard.
///
/// # Panics
///
/// If `group` is 0.
pub fn build_batches<A: AsRef<[u8]>>(
    table: &SlotTable,
    ops: &[Op<'_, A>],
    group: usize,
) -> Vec<Batch> {
    plan_batches(table, ops, group)
        .into_iter()
        .map(|plan| {
            let mut payload = Vec::with_capacity(plan.payload_len);
            write_payload(table, &plan, ops, &mut payload);
            debug_assert_eq!(payload.len(), plan.payload_len);
            Batch {
                shard: plan.shard,
                payload,
                op_indices: plan.op_indices,
                calls: plan.calls,
            }
        })
        .collect()
}

/// The reply of one `FCALL`, as far as reply mapping cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallReply<V> {
    /// The whole call failed with this error; it applies to every operation of the call.
    Error(V),
    /// One element per operation of the call.
    Array(Vec<V>),
}

/// The replies do not have the shape the batch expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeError(pub String);

impl fmt::Display for ShapeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ShapeError {}

/// Maps the replies of a batch's calls (sizes in `calls`) to one result per operation: a
/// call-level error is repeated (via `dup`) for each of the call's operations, an array reply
/// contributes its elements.
pub fn map_replies<V>(
    calls: &[usize],
    replies: Vec<CallReply<V>>,
    mut dup: impl FnMut(&V) -> V,
) -> Result<Vec<V>, ShapeError> {
    if replies.len() != calls.len() {
        return Err(ShapeError(format!(
            "expected {} replies, got {}",
            calls.len(),
            replies.len()
        )));
    }
    let mut out = Vec::with_capacity(calls.iter().sum());
    for (i, (reply, &n)) in replies.into_iter().zip(calls).enumerate() {
        match reply {
            CallReply::Error(e) => {
                for _ in 1..n {
                    out.push(dup(&e));
                }
                out.push(e);
            }
            CallReply::Array(items) => {
                if items.len() != n {
                    return Err(ShapeError(format!(
                        "reply {i} has {} elements, expected {n}",
                        items.len()
                    )));
                }
                out.extend(items);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::pack_command;
    use crate::tag::write_tag;
    use proptest::prelude::*;

    fn table(n: usize) -> SlotTable {
        SlotTable::even(7, (0..n).map(|i| format!("{i:032x}")).collect()).unwrap()
    }

    /// The batch built the slow, obvious way: one `pack_command` per call.
    fn naive(table: &SlotTable, ops: &[Op<'_>], group: usize) -> Vec<Batch> {
        let mut out = Vec::new();
        for shard in 0..table.num_shards() {
            let idx: Vec<usize> = (0..ops.len())
                .filter(|&i| table.shard_for_key(ops[i].key) == shard)
                .collect();
            if idx.is_empty() {
                continue;
            }
            let uuid = table.uuid(shard).unwrap().as_bytes().to_vec();
            let epoch = table.epoch().to_string().into_bytes();
            let mut payload = Vec::new();
            let mut calls = Vec::new();
            for chunk in idx.chunks(group) {
                let mut args: Vec<Vec<u8>> = vec![
                    b"FCALL".to_vec(),
                    b"pg_apply".to_vec(),
                    chunk.len().to_string().into_bytes(),
                ];
                args.extend(chunk.iter().map(|&i| ops[i].key.to_vec()));
                args.push(uuid.clone());
                args.push(epoch.clone());
                for &i in chunk {
                    let op = ops[i];
                    args.push(op.name.to_vec());
                    args.push(write_tag(&uuid, table.epoch(), op.key).to_vec());
                    args.push(op.args.len().to_string().into_bytes());
                    args.extend(op.args.iter().map(|a| a.to_vec()));
                }
                payload.extend(pack_command(&args));
                calls.push(chunk.len());
            }
            out.push(Batch {
                shard,
                payload,
                op_indices: idx,
                calls,
            });
        }
        out
    }

    #[test]
    fn exact_framing() {
        let t = SlotTable::even(3, vec!["u1".into()]).unwrap();
        let args: [&[u8]; 3] = [b"f", b"v", b"0"];
        let ops = [Op {
            name: b"hset",
            key: b"k",
            args: &args,
        }];
        let batches = build_batches(&t, &ops, 128);
        assert_eq!(batches.len(), 1);
        let tag = write_tag(b"u1", 3, b"k");
        let mut want = b"*12\r\n$5\r\nFCALL\r\n$8\r\npg_apply\r\n$1\r\n1\r\n$1\r\nk\r\n$2\r\nu1\r\n$1\r\n3\r\n$4\r\nhset\r\n$16\r\n".to_vec();
        want.extend_from_slice(&tag);
        want.extend_from_slice(b"\r\n$1\r\n3\r\n$1\r\nf\r\n$1\r\nv\r\n$1\r\n0\r\n");
        assert_eq!(batches[0].payload, want);
        assert_eq!(batches[0].calls, vec![1]);
        assert!(build_batches::<&[u8]>(&t, &[], 1).is_empty());
    }

    #[test]
    fn maps_replies() {
        let calls = [2, 1];
        let got = map_replies(
            &calls,
            vec![CallReply::Error("E"), CallReply::Array(vec!["a"])],
            |e| e,
        )
        .unwrap();
        assert_eq!(got, vec!["E", "E", "a"]);
        assert!(map_replies(&calls, vec![CallReply::Error("E")], |e| *e).is_err());
        assert!(map_replies(
            &calls,
            vec![CallReply::Array(vec!["a"]), CallReply::Array(vec!["b"])],
            |e| *e
        )
        .is_err());
    }

    fn op_strategy() -> impl Strategy<Value = (Vec<u8>, Vec<u8>, Vec<Vec<u8>>)> {
        (
            prop_oneof![
                Just(b"hset".to_vec()),
                Just(b"del".to_vec()),
                proptest::collection::vec(any::<u8>(), 0..5)
            ],
            prop_oneof![
                "[a-z{}:]{0,12}".prop_map(String::into_bytes),
                proptest::collection::vec(any::<u8>(), 0..20),
            ],
            proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..30), 0..4),
        )
    }

    proptest! {
        #[test]
        fn matches_naive(
            raw in proptest::collection::vec(op_strategy(), 0..60),
            shards in 1usize..5,
            group in 1usize..10,
        ) {
            let t = table(shards);
            let arg_refs: Vec<Vec<&[u8]>> = raw.iter().map(|(_, _, a)| a.iter().map(Vec::as_slice).collect()).collect();
            let ops: Vec<Op<'_>> = raw
                .iter()
                .zip(&arg_refs)
                .map(|((n, k, _), a)| Op { name: n, key: k, args: a })
                .collect();
            let got = build_batches(&t, &ops, group);
            prop_assert_eq!(&got, &naive(&t, &ops, group));
            for (plan, batch) in plan_batches(&t, &ops, group).iter().zip(&got) {
                prop_assert_eq!(plan.payload_len, batch.payload.len());
                let mut buf = vec![0u8; plan.payload_len];
                let mut cursor = crate::resp::Cursor::new(&mut buf);
                write_payload(&t, plan, &ops, &mut cursor);
                prop_assert_eq!(cursor.position(), buf.len());
                prop_assert_eq!(&buf, &batch.payload);
            }
            let total: usize = got.iter().map(|b| b.op_indices.len()).sum();
            prop_assert_eq!(total, ops.len());
            for b in &got {
                prop_assert!(b.calls.iter().all(|&c| c >= 1 && c <= group));
            }
        }
    }
}
