//! The shared state's layout in Redis, and every change to it that must be
//! atomic, as Lua scripts (Redis runs each alone). Keys start with a prefix
//! (`hearth:`):
//!
//! - `job:<op>` — the queued or running action ([`crate::codec::encode_job`]);
//!   deleted when the operation completes, so it existing means in flight;
//! - `op:<op>` — the operation's latest state, kept for the retention period
//!   after it completes; each change is also published on `ops`;
//! - `queue` — a sorted set of operations waiting for a replica, by enqueue
//!   time; removing one from it is the claim;
//! - `holder:<op>` and `leases` — which replica runs it, and until when its
//!   lease holds (a sorted set by deadline); a lease not renewed puts the
//!   job back in the queue;
//! - `tries:<op>` — how many times a replica took it from the queue;
//! - `runner:<op>` — the executor running it (`OWNER/ID`): the only one
//!   whose word moves the work to another replica;
//! - `dedup:<key>` — the operation identical requests join;
//! - `watch:<op>` — set while some client watches it (on any replica);
//! - `cancel:<op>` — a client cancelled it through a replica that does not
//!   hold it (also published on `cancel`; the key outlasts a lost message);
//! - `replica:<id>` and `replicas` — each replica's advert ([`crate::codec::advert`]);
//! - channels `ops` (operation changes), `wake` (work queued) and `cancel`.
//!
//! Scripts build key names from the prefix, which a Redis Cluster would
//! refuse; Hearth's state is one database.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{RedisResult, Script};

/// Every script reads the time from Redis (`TIME`), so queue order and
/// lease deadlines do not depend on the replicas' clocks agreeing.
macro_rules! script {
    ($body:literal) => {
        concat!(
            "local function now_ms() local t = redis.call('TIME') ",
            "return string.format('%.0f', t[1] * 1000 + math.floor(t[2] / 1000)) end\n",
            $body
        )
    };
}

const SUBMIT: &str = script!(
    r#"
local P, name = ARGV[1], ARGV[2]
if ARGV[9] ~= '' then
  local dkey = P .. 'dedup:' .. ARGV[9]
  local other = redis.call('GET', dkey)
  if other and redis.call('EXISTS', P .. 'job:' .. other) == 1 then
    local op = redis.call('GET', P .. 'op:' .. other)
    if op then
      redis.call('SET', P .. 'watch:' .. other, '1', 'PX', ARGV[8])
      return {other, op}
    end
  end
  redis.call('SET', dkey, name, 'PX', ARGV[7])
end
redis.call('SET', P .. 'job:' .. name, ARGV[3], 'PX', ARGV[7])
redis.call('SET', P .. 'op:' .. name, ARGV[4], 'PX', ARGV[7])
redis.call('SET', P .. 'watch:' .. name, '1', 'PX', ARGV[8])
local now = now_ms()
if ARGV[6] ~= '' then
  redis.call('SET', P .. 'holder:' .. name, ARGV[6], 'PX', ARGV[7])
  redis.call('ZADD', P .. 'leases', now + ARGV[5], name)
  redis.call('SET', P .. 'tries:' .. name, 1, 'PX', ARGV[7])
else
  redis.call('ZADD', P .. 'queue', now, name)
  redis.call('PUBLISH', P .. 'wake', name)
end
return {name, ARGV[4]}
"#
);

const CLAIM: &str = script!(
    r#"
local P, name, adopt = ARGV[1], ARGV[2], ARGV[6] == '1'
if adopt and redis.call('GET', P .. 'runner:' .. name) ~= ARGV[7] then
  return false
end
local queued = redis.call('ZREM', P .. 'queue', name)
if queued == 0 and not adopt then return false end
local job = redis.call('GET', P .. 'job:' .. name)
if not job then return false end
redis.call('SET', P .. 'holder:' .. name, ARGV[3], 'PX', ARGV[5])
redis.call('ZADD', P .. 'leases', now_ms() + ARGV[4], name)
local tries
if adopt then
  tries = tonumber(redis.call('GET', P .. 'tries:' .. name) or '1')
else
  -- Whoever ran it before has no say over this run.
  redis.call('DEL', P .. 'runner:' .. name)
  tries = redis.call('INCR', P .. 'tries:' .. name)
  redis.call('PEXPIRE', P .. 'tries:' .. name, ARGV[5])
end
local state = redis.call('EXISTS', P .. 'watch:' .. name)
if redis.call('EXISTS', P .. 'cancel:' .. name) == 1 then state = 2 end
return {job, tries, state}
"#
);

const RENEW: &str = script!(
    r#"
local P, me = ARGV[1], ARGV[2]
local deadline = now_ms() + ARGV[3]
local out = {}
for i = 4, #ARGV do
  local name = ARGV[i]
  if redis.call('GET', P .. 'holder:' .. name) == me then
    redis.call('ZADD', P .. 'leases', 'XX', deadline, name)
    if redis.call('EXISTS', P .. 'cancel:' .. name) == 1 then
      out[#out + 1] = 3
    else
      out[#out + 1] = 1 + redis.call('EXISTS', P .. 'watch:' .. name)
    end
  else
    out[#out + 1] = 0
  end
end
return out
"#
);

const UPDATE: &str = r#"
local P, name = ARGV[1], ARGV[2]
if redis.call('GET', P .. 'holder:' .. name) ~= ARGV[3] then return 0 end
redis.call('SET', P .. 'op:' .. name, ARGV[4], 'PX', ARGV[5])
if ARGV[6] ~= '' then
  redis.call('SET', P .. 'runner:' .. name, ARGV[6], 'PX', ARGV[5])
end
redis.call('PUBLISH', P .. 'ops', ARGV[4])
return 1
"#;

const FINISH: &str = r#"
local P, name = ARGV[1], ARGV[2]
if ARGV[3] ~= '' then
  if redis.call('GET', P .. 'holder:' .. name) ~= ARGV[3] then return 0 end
elseif redis.call('ZREM', P .. 'queue', name) == 0 then
  return 0
end
redis.call('SET', P .. 'op:' .. name, ARGV[4], 'PX', ARGV[5])
redis.call('DEL', P .. 'job:' .. name, P .. 'holder:' .. name, P .. 'tries:' .. name,
  P .. 'watch:' .. name, P .. 'runner:' .. name, P .. 'cancel:' .. name)
redis.call('ZREM', P .. 'leases', name)
local d = P .. 'dedup:' .. ARGV[6]
if redis.call('GET', d) == name then redis.call('DEL', d) end
redis.call('PUBLISH', P .. 'ops', ARGV[4])
return 1
"#;

const RELEASE: &str = script!(
    r#"
local P, name = ARGV[1], ARGV[2]
if redis.call('GET', P .. 'holder:' .. name) ~= ARGV[3] then return 0 end
redis.call('DEL', P .. 'holder:' .. name)
redis.call('ZREM', P .. 'leases', name)
if redis.call('EXISTS', P .. 'job:' .. name) == 1 then
  redis.call('ZADD', P .. 'queue', now_ms(), name)
  redis.call('PUBLISH', P .. 'wake', name)
end
return 1
"#
);

const REAP: &str = script!(
    r#"
local P = ARGV[1]
local now = now_ms()
local expired = redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', now - ARGV[2],
  'LIMIT', 0, 100)
for _, name in ipairs(expired) do
  redis.call('ZREM', P .. 'leases', name)
  redis.call('DEL', P .. 'holder:' .. name)
  if redis.call('EXISTS', P .. 'job:' .. name) == 1 then
    redis.call('ZADD', P .. 'queue', now, name)
  end
end
if #expired > 0 then redis.call('PUBLISH', P .. 'wake', '') end
return expired
"#
);

/// Queued before `ARGV[2]` ms ago, by Redis's clock.
const OVERDUE: &str = script!(
    r#"
return redis.call('ZRANGEBYSCORE', ARGV[1] .. 'queue', '-inf', now_ms() - ARGV[2],
  'LIMIT', 0, 100)
"#
);

/// How a lease renewal went for one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Another replica holds it now (or its lease lapsed).
    Lost,
    /// Renewed; no client watches it any more.
    Unwatched,
    /// Renewed and watched.
    Watched,
    /// Renewed; a client cancelled it through another replica.
    Cancelled,
}

/// Where a job goes when it is submitted.
pub enum Placement<'a> {
    /// Into the queue, for any replica.
    Queue,
    /// Straight to this replica, which has a free executor for it.
    Here(&'a str),
}

/// A job taken for this replica.
pub struct Claimed {
    pub job: Vec<u8>,
    /// How many times a replica has taken it from the queue.
    pub tries: u32,
    /// Whether a client still watches it.
    pub watched: bool,
    /// A client cancelled it.
    pub cancelled: bool,
}

/// What a submission produced.
pub struct Submitted {
    /// The operation's name: the new one, or the identical one it joined.
    pub name: String,
    pub op: Vec<u8>,
}

/// The scripts, bound to a connection and a prefix.
pub struct State {
    conn: ConnectionManager,
    pub prefix: String,
    /// How long an in-flight record lives without being finished (a safety
    /// net against records no replica will ever finish).
    pub record_ttl: Duration,
    submit: Script,
    claim: Script,
    renew: Script,
    update: Script,
    finish: Script,
    release: Script,
    reap: Script,
    overdue: Script,
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl State {
    pub fn new(conn: ConnectionManager, prefix: &str, record_ttl: Duration) -> Self {
        State {
            conn,
            prefix: prefix.to_string(),
            record_ttl,
            submit: Script::new(SUBMIT),
            claim: Script::new(CLAIM),
            renew: Script::new(RENEW),
            update: Script::new(UPDATE),
            finish: Script::new(FINISH),
            release: Script::new(RELEASE),
            reap: Script::new(REAP),
            overdue: Script::new(OVERDUE),
        }
    }

    pub fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    pub fn key(&self, kind: &str, name: &str) -> String {
        format!("{}{kind}:{name}", self.prefix)
    }

    pub fn channel(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn submit(
        &self,
        name: &str,
        job: &[u8],
        op: &[u8],
        placement: Placement<'_>,
        lease: Duration,
        watch: Duration,
        dedup: Option<&str>,
    ) -> RedisResult<Submitted> {
        let holder = match placement {
            Placement::Queue => "",
            Placement::Here(me) => me,
        };
        let (name, op): (String, Vec<u8>) = self
            .submit
            .arg(&self.prefix)
            .arg(name)
            .arg(job)
            .arg(op)
            .arg(ms(lease))
            .arg(holder)
            .arg(ms(self.record_ttl))
            .arg(ms(watch))
            .arg(dedup.unwrap_or(""))
            .invoke_async(&mut self.conn())
            .await?;
        Ok(Submitted { name, op })
    }

    /// Takes `name` from the queue for `me`, or (`adopt`ing for the
    /// executor `runner`, `OWNER/ID`, that came here running it) from
    /// whatever replica holds it — only if that executor is the one
    /// recorded as running it.
    pub async fn claim(
        &self,
        name: &str,
        me: &str,
        lease: Duration,
        adopt: Option<&str>,
    ) -> RedisResult<Option<Claimed>> {
        let got: Option<(Vec<u8>, u32, u8)> = self
            .claim
            .arg(&self.prefix)
            .arg(name)
            .arg(me)
            .arg(ms(lease))
            .arg(ms(self.record_ttl))
            .arg(if adopt.is_some() { "1" } else { "0" })
            .arg(adopt.unwrap_or(""))
            .invoke_async(&mut self.conn())
            .await?;
        Ok(got.map(|(job, tries, state)| Claimed {
            job,
            tries,
            watched: state == 1,
            cancelled: state == 2,
        }))
    }

    pub async fn renew(
        &self,
        me: &str,
        lease: Duration,
        names: &[String],
    ) -> RedisResult<Vec<Renewal>> {
        if names.is_empty() {
            return Ok(vec![]);
        }
        let mut call = self.renew.prepare_invoke();
        call.arg(&self.prefix).arg(me).arg(ms(lease));
        for n in names {
            call.arg(n);
        }
        let codes: Vec<u8> = call.invoke_async(&mut self.conn()).await?;
        Ok(codes
            .into_iter()
            .map(|c| match c {
                0 => Renewal::Lost,
                1 => Renewal::Unwatched,
                2 => Renewal::Watched,
                _ => Renewal::Cancelled,
            })
            .collect())
    }

    /// Publishes a state of an operation `me` holds, and the executor
    /// running it (`OWNER/ID`) if any; false if `me` no longer holds it.
    pub async fn update(
        &self,
        name: &str,
        me: &str,
        op: &[u8],
        runner: Option<&str>,
    ) -> RedisResult<bool> {
        self.update
            .arg(&self.prefix)
            .arg(name)
            .arg(me)
            .arg(op)
            .arg(ms(self.record_ttl))
            .arg(runner.unwrap_or(""))
            .invoke_async(&mut self.conn())
            .await
    }

    /// Publishes the final state of an operation `holder` holds (None: one
    /// still in the queue, which this takes out) and lets its job go; false
    /// if it was not so.
    pub async fn finish(
        &self,
        name: &str,
        holder: Option<&str>,
        op: &[u8],
        retention: Duration,
        dedup: &str,
    ) -> RedisResult<bool> {
        self.finish
            .arg(&self.prefix)
            .arg(name)
            .arg(holder.unwrap_or(""))
            .arg(op)
            .arg(ms(retention))
            .arg(dedup)
            .invoke_async(&mut self.conn())
            .await
    }

    /// Puts an operation `me` holds back in the queue.
    pub async fn release(&self, name: &str, me: &str) -> RedisResult<bool> {
        self.release
            .arg(&self.prefix)
            .arg(name)
            .arg(me)
            .invoke_async(&mut self.conn())
            .await
    }

    /// Puts the jobs of leases lapsed for longer than `grace` back in the
    /// queue; returns them. The grace gives holders that were cut off from
    /// Redis as long again to renew once it is back.
    pub async fn reap(&self, grace: Duration) -> RedisResult<Vec<String>> {
        self.reap
            .arg(&self.prefix)
            .arg(ms(grace))
            .invoke_async(&mut self.conn())
            .await
    }

    /// Operations queued for longer than `limit`.
    pub async fn overdue(&self, limit: Duration) -> RedisResult<Vec<String>> {
        self.overdue
            .arg(&self.prefix)
            .arg(ms(limit))
            .invoke_async(&mut self.conn())
            .await
    }
}
