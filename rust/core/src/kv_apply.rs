//! The fast path of the command processor: a whole log entry of plain `put` / `delete` commands
//! (and `noop`s: a linearizable read's barrier joins the next entry as one)
//! applied in Rust, with the same results and the same state bytes as
//! `synapse/state/processor.py` (which stays the definition: tests run both on random entries).
//!
//! It only ever *proves* the ordinary case: every command decodes, is valid, is not a replay
//! of an applied request id, meets its `if_version`, and its token grants `kv:write:<key>`.
//! Anything else — another op, a field it cannot prove valid, a refusal, a damaged record —
//! and it returns `None` having changed nothing, and the Python processor applies the entry
//! (and writes the error). So no error text lives here, and a gap in this file can only cost
//! speed, never a different result.

use std::collections::HashMap;

use crate::msgpack::{decode, Value, Writer};
use crate::{chain, Digest, Op, StateStore};

// synapse/state/keys.py and commands.py: the layout and limits these mirror.
const KV: &[u8] = b"kv/";
const RID: &[u8] = b"rid/";
const RIDX: &[u8] = b"ridx/";
const RID_COUNT: &[u8] = b"meta/rid_count";
const CHAIN: &[u8] = b"meta/chain";
const SEC_PRINCIPAL: &[u8] = b"sec/p/";
const SEC_ROLE: &[u8] = b"sec/r/";
const SEC_TOKEN: &[u8] = b"sec/t/";
const SCHEMA_VERSION: i128 = 1;
const MAX_KEY_BYTES: usize = 1024;
const MAX_VALUE_BYTES: usize = 1 << 20;
const MAX_RID_CHARS: usize = 128;
const REQUEST_HASH_BYTES: usize = 16;
const MAX_NAME_CHARS: usize = 128;
const MAX_CHAIN: usize = 8;
const INDEX_BYTES: usize = 8;

/// What the fast path hands back for one command.
#[derive(Debug, Clone, PartialEq)]
pub enum KvResult {
    Put { key: String, version: u64 },
    Delete { key: String, deleted: bool },
    Noop,
}

/// One applied change to a key (`synapse.state.records.KvChange` without the entry's index).
#[derive(Debug, Clone, PartialEq)]
pub struct KvChange {
    pub key: String,
    /// None: deleted (then the three numbers are 0).
    pub value: Option<Vec<u8>>,
    pub version: u64,
    pub create_index: u64,
    pub mod_index: u64,
}

#[derive(Debug)]
pub struct KvOutcome {
    pub results: Vec<KvResult>,
    pub changes: Vec<KvChange>,
    pub chain: Digest,
}

#[derive(PartialEq)]
enum Kind {
    Put,
    Delete,
    Noop,
}

/// A put, delete or noop proven valid (commands.py `validate_command`, check_json off).
struct Command<'a> {
    kind: Kind,
    key: &'a str,
    value: &'a [u8],
    if_version: Option<u64>,
    rid: Option<&'a str>,
    request_hash: Option<&'a [u8]>,
    auth: Option<(&'a str, u64)>,
}

/// Applies the entry at `index` to `store` — its commands, the dedup bound and the audit
/// chain link — and returns what it did, or returns None having changed nothing.
pub fn apply_kv_entry(store: &mut StateStore, index: u64, payload: &[u8], dedup_capacity: u64) -> Option<KvOutcome> {
    let entry = decode(payload)?;
    let commands = match entry.as_array()? {
        [version, Value::Array(commands)] if *version == Value::Int(SCHEMA_VERSION) && !commands.is_empty() => commands,
        _ => return None,
    };
    let commands: Vec<Command> = commands.iter().map(command).collect::<Option<_>>()?;
    let prev_chain = stored_chain(store)?;

    let mut run = Run { store, index, writes: Overlay::default(), results: Vec::new(), changes: Vec::new(), grants: HashMap::new() };
    for c in &commands {
        run.apply(c)?;
    }
    let Run { results, changes, mut writes, store, .. } = run;
    bound_dedup(store, &mut writes, dedup_capacity)?;
    let link = chain(&prev_chain, index, payload);
    let mut w = Writer::new();
    w.array(2).uint(index).bin(&link);
    writes.set(CHAIN, Some(w.0));
    store.apply(writes.into_ops()).ok()?;
    Some(KvOutcome { results, changes, chain: link })
}

fn command<'a>(v: &Value<'a>) -> Option<Command<'a>> {
    let Value::Map(pairs) = v else { return None };
    let kind = match v.field("op")?.as_str()? {
        "put" => Kind::Put,
        "delete" => Kind::Delete,
        "noop" => Kind::Noop,
        _ => return None,
    };
    let mut c = Command { kind, key: "", value: &[], if_version: None, rid: None, request_hash: None, auth: None };
    let (mut seen, mut auth_ms) = (0u8, None);
    for (name, value) in pairs {
        let bit = match (name.as_str()?, value) {
            ("op", _) => 1,
            ("key", Value::Str(k)) if c.kind != Kind::Noop && is_key(k) => {
                c.key = k;
                2
            }
            ("value", Value::Bin(b)) if c.kind == Kind::Put && b.len() <= MAX_VALUE_BYTES => {
                c.value = b;
                4
            }
            ("if_version", n) if c.kind != Kind::Noop => {
                c.if_version = Some(n.as_uint()?);
                8
            }
            ("rid", Value::Str(r)) if (1..=MAX_RID_CHARS).contains(&r.chars().count()) => {
                c.rid = Some(r);
                16
            }
            ("request_hash", Value::Bin(h)) if h.len() == REQUEST_HASH_BYTES => {
                c.request_hash = Some(h);
                32
            }
            ("auth", Value::Str(a)) if is_name(a) => {
                c.auth = Some((a, 0));
                64
            }
            ("auth_ms", n) => {
                auth_ms = Some(n.as_uint()?);
                128
            }
            _ => return None, // an unknown field, or one this path cannot prove valid
        };
        if seen & bit != 0 {
            return None; // a repeated field (Python would keep the last)
        }
        seen |= bit;
    }
    let required = match c.kind {
        Kind::Put => 1 | 2 | 4,
        Kind::Delete => 1 | 2,
        Kind::Noop => 1,
    };
    if seen & required != required || (c.request_hash.is_some() && c.rid.is_none()) {
        return None;
    }
    match (c.auth, auth_ms) {
        (Some((a, _)), Some(ms)) => c.auth = Some((a, ms)),
        (None, None) => {}
        _ => return None,
    }
    Some(c)
}

fn is_key(k: &str) -> bool {
    (1..=MAX_KEY_BYTES).contains(&k.len()) && !k.contains('\0')
}

/// A security name (`check_name`), proven only for ASCII: Python's `isprintable` over all of
/// Unicode is left to Python.
fn is_name(s: &str) -> bool {
    (1..=MAX_NAME_CHARS).contains(&s.len()) && s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

fn stored_chain(store: &StateStore) -> Option<Digest> {
    let Some(raw) = store.get(CHAIN) else { return Some([0; 32]) };
    match decode(raw)?.as_array()? {
        [_, Value::Bin(head)] => (*head).try_into().ok(),
        _ => None,
    }
}

/// The entry's pending writes over the store, last write per key (processor.py `_Overlay`).
/// No order is kept: the keys of a store batch are unique, so its result does not depend on
/// theirs.
#[derive(Default)]
struct Overlay(HashMap<Vec<u8>, Option<Vec<u8>>>);

impl Overlay {
    fn get<'s>(&'s self, store: &'s StateStore, key: &[u8]) -> Option<&'s [u8]> {
        match self.0.get(key) {
            Some(v) => v.as_deref(),
            None => store.get(key),
        }
    }

    fn set(&mut self, key: &[u8], value: Option<Vec<u8>>) {
        self.0.insert(key.to_vec(), value);
    }

    fn into_ops(self) -> Vec<Op> {
        self.0
            .into_iter()
            .map(|(k, v)| match v {
                Some(v) => Op::put(&k, &v),
                None => Op::delete(&k),
            })
            .collect()
    }
}

struct Run<'s> {
    store: &'s mut StateStore,
    index: u64,
    writes: Overlay,
    results: Vec<KvResult>,
    changes: Vec<KvChange>,
    grants: HashMap<String, Option<Grant>>,
}

impl Run<'_> {
    fn apply(&mut self, c: &Command) -> Option<()> {
        let rid_key = c.rid.map(|r| [RID, r.as_bytes()].concat());
        if let Some(k) = &rid_key {
            if self.writes.get(self.store, k).is_some() {
                return None; // a replay: the Python processor answers it
            }
        }
        if let Some((accessor, now_ms)) = c.auth {
            if !self.grants.contains_key(accessor) {
                let get = |k: &[u8]| self.writes.get(self.store, k);
                let grant = grant_of(&get, accessor);
                self.grants.insert(accessor.to_owned(), grant);
            }
            // A noop needs no scope, only a live token (security.required_scopes).
            let scope = (c.kind != Kind::Noop).then_some(c.key);
            if !self.grants[accessor].as_ref()?.allows(now_ms, scope) {
                return None;
            }
        }
        let kv_key = [KV, c.key.as_bytes()].concat();
        let record = match self.writes.get(self.store, &kv_key) {
            Some(raw) if c.kind != Kind::Noop => Some(kv_record(raw)?),
            _ => None,
        };
        let current = record.map_or(0, |(version, _)| version);
        if c.if_version.is_some_and(|want| want != current) {
            return None; // a conflict: its message is Python's
        }
        let mut w = Writer::new();
        let result = match c.kind {
            Kind::Put => {
                let version = current.checked_add(1)?;
                let created = record.map_or(self.index, |(_, created)| created);
                w.array(4).bin(c.value).uint(version).uint(created).uint(self.index);
                self.writes.set(&kv_key, Some(std::mem::take(&mut w.0)));
                self.changes.push(KvChange {
                    key: c.key.to_owned(),
                    value: Some(c.value.to_vec()),
                    version,
                    create_index: created,
                    mod_index: self.index,
                });
                KvResult::Put { key: c.key.to_owned(), version }
            }
            Kind::Delete => {
                if record.is_some() {
                    self.writes.set(&kv_key, None);
                    self.changes.push(KvChange {
                        key: c.key.to_owned(),
                        value: None,
                        version: 0,
                        create_index: 0,
                        mod_index: 0,
                    });
                }
                KvResult::Delete { key: c.key.to_owned(), deleted: record.is_some() }
            }
            Kind::Noop => KvResult::Noop,
        };
        if let (Some(k), Some(rid)) = (rid_key, c.rid) {
            // keys.encode_rid: [index, result] or [index, result, request_hash]
            w.array(if c.request_hash.is_some() { 3 } else { 2 }).uint(self.index);
            write_result(&mut w, &result, self.index);
            if let Some(h) = c.request_hash {
                w.bin(h);
            }
            self.writes.set(&k, Some(w.0));
            self.writes.set(&[RIDX, &self.index.to_be_bytes(), rid.as_bytes()].concat(), Some(Vec::new()));
        }
        self.results.push(result);
        Some(())
    }
}

/// (version, create_index) of a stored `[value, version, create_index, mod_index]`.
fn kv_record(raw: &[u8]) -> Option<(u64, u64)> {
    match decode(raw)?.as_array()? {
        [Value::Bin(_), version, created, Value::Int(_)] => Some((version.as_uint()?, created.as_uint()?)),
        _ => None,
    }
}

/// A result as the processor's dict, in its key order: the bytes go into the rid record.
pub fn write_result(w: &mut Writer, result: &KvResult, index: u64) {
    match result {
        KvResult::Put { key, version } => {
            w.map(4).str("ok").bool(true).str("key").str(key).str("version").uint(*version);
        }
        KvResult::Delete { key, deleted } => {
            w.map(4).str("ok").bool(true).str("key").str(key).str("deleted").bool(*deleted);
        }
        KvResult::Noop => {
            w.map(2).str("ok").bool(true);
        }
    }
    w.str("index").uint(index);
}

/// processor.py `_bound_dedup`: at most `capacity` request ids, the oldest (ridx/ key order)
/// evicted with their records.
fn bound_dedup(store: &StateStore, writes: &mut Overlay, capacity: u64) -> Option<()> {
    let mut added: Vec<Vec<u8>> =
        writes.0.iter().filter(|(k, v)| k.starts_with(RIDX) && v.is_some()).map(|(k, _)| k.clone()).collect();
    if added.is_empty() {
        return Some(());
    }
    let stored = match store.get(RID_COUNT) {
        None => 0,
        Some(raw) => decode(raw)?.as_uint()?,
    };
    let mut count = stored.checked_add(added.len() as u64)?;
    if count > capacity {
        let excess = (count - capacity) as usize;
        let mut victims: Vec<Vec<u8>> = store.scan_prefix(RIDX, excess).into_iter().map(|(k, _)| k.to_vec()).collect();
        victims.append(&mut added);
        victims.sort();
        victims.truncate(excess);
        for victim in victims {
            let rid = victim.get(RIDX.len() + INDEX_BYTES..)?;
            std::str::from_utf8(rid).ok()?; // Python decodes it (and fails the entry if it cannot)
            writes.set(&[RID, rid].concat(), None);
            writes.set(&victim, None);
        }
        count = capacity;
    }
    let mut w = Writer::new();
    w.uint(count);
    writes.set(RID_COUNT, Some(w.0));
    Some(())
}

/// A token's grant as far as this path can prove it (security.py `grant_of`): every layer's
/// allows, every deny, and the earliest expiry along its chain. Kept for the whole entry: the
/// fast path never writes a security record, so an entry's commands all see the same ones.
struct Grant {
    layers: Vec<Vec<Scope>>,
    denies: Vec<Scope>,
    expires_ms: Option<u64>,
}

impl Grant {
    /// Whether the token is live at `now_ms` and grants `kv:write:<key>` (`key` None: no
    /// scope) — `Grant.missing`; false: not provable here.
    fn allows(&self, now_ms: u64, key: Option<&str>) -> bool {
        if self.expires_ms.is_some_and(|at| now_ms >= at) {
            return false;
        }
        let Some(key) = key else { return true };
        // A deny takes the scope away when it covers it (`_touches`: a single key is no range).
        let denied = self.denies.iter().any(|d| d.covers_kv_write(key));
        !denied && self.layers.iter().all(|layer| layer.iter().any(|g| g.covers_kv_write(key)))
    }
}

/// The grant of the token `accessor`, or None: the records do not prove one (a token, its
/// principal or a record gone or malformed, the chain too long); the Python processor then
/// decides, and writes the refusal if there is one.
fn grant_of<'s>(get: &dyn Fn(&[u8]) -> Option<&'s [u8]>, accessor: &str) -> Option<Grant> {
    let mut grant = Grant { layers: Vec::new(), denies: Vec::new(), expires_ms: None };
    let mut principal: Option<String> = None;
    let mut current = Some(accessor.to_owned());
    let mut seen = 0;
    while let Some(name) = current {
        let token = decode(get(&[SEC_TOKEN, name.as_bytes()].concat())?)?;
        // security.py `_token_view` reads all six fields of every token in the chain.
        let (expires_ms, owner, parent) = (token.field("expires_ms")?, token.field("principal")?, token.field("parent")?);
        let (allow, deny) = (scopes(token.field("allow")?)?, scopes(token.field("deny")?)?);
        token.field("hash")?;
        if *expires_ms != Value::Nil {
            let at = expires_ms.as_uint()?;
            grant.expires_ms = Some(grant.expires_ms.map_or(at, |e| e.min(at)));
        }
        if principal.is_none() {
            principal = Some(owner.as_str()?.to_owned());
        }
        grant.layers.push(allow);
        grant.denies.extend(deny);
        current = match parent {
            Value::Nil => None,
            Value::Str(parent) => Some((*parent).to_owned()),
            _ => return None,
        };
        seen += 1;
        if seen > MAX_CHAIN + 1 {
            return None;
        }
    }
    let principal = decode(get(&[SEC_PRINCIPAL, principal?.as_bytes()].concat())?)?;
    let mut role_allows = Vec::new();
    for role in principal.field("roles")?.as_array()? {
        // security.py `_role_view` reads both lists of every role that exists.
        if let Some(raw) = get(&[SEC_ROLE, role.as_str()?.as_bytes()].concat()) {
            let role = decode(raw)?;
            role_allows.extend(scopes(role.field("allow")?)?);
            grant.denies.extend(scopes(role.field("deny")?)?);
        }
    }
    grant.layers.push(role_allows);
    Some(grant)
}

/// A granted or denied scope, as far as `kv:write:<key>` needs it: `*`, a `kv:write` prefix,
/// or another kind (which neither covers nor touches it).
enum Scope {
    All,
    KvWrite(String),
    Other,
}

/// security.py `parse_scope` over a list; None if any entry is not a scope (Python raises).
fn scopes(list: &Value) -> Option<Vec<Scope>> {
    // The kinds of security.SCOPE_KINDS, with how their resource matches.
    const PREFIX_KINDS: [&str; 4] = ["kv:read", "kv:write", "memory:read", "memory:write"];
    const BARE_KINDS: [&str; 8] =
        ["task:submit", "task:network", "worker", "checkpoint", "rollback", "cluster:admin", "debug", "node"];
    list.as_array()?
        .iter()
        .map(|v| {
            let text = v.as_str()?;
            if text.is_empty() || text.chars().count() > 1200 {
                return None;
            }
            if text == "*" {
                return Some(Scope::All);
            }
            if text == "kv:write" {
                return Some(Scope::KvWrite(String::new()));
            }
            if let Some(prefix) = text.strip_prefix("kv:write:") {
                return Some(Scope::KvWrite(prefix.to_owned()));
            }
            let other = PREFIX_KINDS.iter().any(|k| text == *k || text.strip_prefix(k).is_some_and(|r| r.starts_with(':')))
                || BARE_KINDS.contains(&text)
                || text == "task:fs"
                || text.strip_prefix("task:fs:").is_some_and(|p| p.starts_with('/'));
            other.then_some(Scope::Other)
        })
        .collect()
}

impl Scope {
    fn covers_kv_write(&self, key: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::KvWrite(prefix) => key.starts_with(prefix.as_str()),
            Scope::Other => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(commands: &[Vec<u8>]) -> Vec<u8> {
        let mut w = Writer::new();
        w.array(2).uint(1).array(commands.len());
        for c in commands {
            w.0.extend_from_slice(c);
        }
        w.0
    }

    fn put(key: &str, value: &[u8], rid: Option<&str>) -> Vec<u8> {
        let mut w = Writer::new();
        w.map(if rid.is_some() { 4 } else { 3 }).str("op").str("put").str("key").str(key).str("value").bin(value);
        if let Some(r) = rid {
            w.str("rid").str(r);
        }
        w.0
    }

    #[test]
    fn puts_write_versions_and_dedup_records_and_replays_are_left_to_python() {
        let mut store = StateStore::new();
        let out = apply_kv_entry(&mut store, 1, &entry(&[put("a", b"1", Some("r1")), put("a", b"2", None)]), 10).unwrap();
        assert_eq!(out.results, vec![
            KvResult::Put { key: "a".into(), version: 1 },
            KvResult::Put { key: "a".into(), version: 2 },
        ]);
        assert_eq!(out.changes[1].create_index, 1);
        let mut noop = Writer::new();
        noop.map(1).str("op").str("noop");
        let out = apply_kv_entry(&mut store, 2, &entry(&[noop.0, put("b", b"1", None)]), 10).unwrap();
        assert_eq!(out.results[0], KvResult::Noop);
        assert_eq!(out.changes.len(), 1);
        assert!(store.get(b"rid/r1").is_some());
        assert_eq!(store.get(b"meta/rid_count"), Some(&[1u8][..]));
        let digest = store.digest();
        assert!(apply_kv_entry(&mut store, 3, &entry(&[put("b", b"1", Some("r1"))]), 10).is_none());
        assert_eq!(store.digest(), digest, "a bail changes nothing");
    }

    #[test]
    fn the_oldest_request_ids_are_evicted_beyond_the_capacity() {
        let mut store = StateStore::new();
        for i in 1..=5u64 {
            apply_kv_entry(&mut store, i, &entry(&[put("k", b"v", Some(&format!("r{i}")))]), 3).unwrap();
        }
        let left: Vec<_> = store.scan_prefix(RID, usize::MAX).into_iter().map(|(k, _)| k.to_vec()).collect();
        assert_eq!(left, vec![b"rid/r3".to_vec(), b"rid/r4".to_vec(), b"rid/r5".to_vec()]);
        assert_eq!(store.scan_prefix(RIDX, usize::MAX).len(), 3);
    }

    #[test]
    fn anything_but_a_valid_put_or_delete_is_left_to_python() {
        let mut store = StateStore::new();
        let mut txn = Writer::new();
        txn.map(1).str("op").str("txn");
        let mut unknown = Writer::new();
        unknown.map(4).str("op").str("put").str("key").str("a").str("value").bin(b"1").str("ttl").uint(3);
        for bad in [
            entry(&[txn.0]),
            entry(&[unknown.0]),
            entry(&[put("", b"1", None)]),
            entry(&[put("a\0b", b"1", None)]),
            entry(&[put(&"k".repeat(1025), b"1", None)]),
            entry(&[put("a", b"1", Some(&"r".repeat(129)))]),
            entry(&[]),
            b"\x92\x02\x90".to_vec(),
            b"garbage".to_vec(),
        ] {
            assert!(apply_kv_entry(&mut store, 1, &bad, 10).is_none());
            assert_eq!(store.len(), 0);
        }
    }
}
