"""Lua scripts of the Redis backend. Every key a script touches is passed in KEYS and carries the
session's hash tag, so each script runs in one Cluster slot.

Session layout: `<base>:meta` is a hash {v: version, g: generation, n: chunk count, s: size,
h: header JSON}; the value is in `<base>:data:<g>:<i>` chunks; `<base>:lock` holds the lease token.
A put uploads the chunks of a new generation first, then COMMIT swaps the meta atomically, so a
reader never sees half a value. Scripts are idempotent where a retried call could repeat them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Script:
    name: str
    source: str

    @property
    def sha(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()


# Lease check shared by COMMIT and DELETE: ARGV token '' = the caller has no lease.
_LEASE_CHECK = """
local holder = redis.call('GET', KEYS[2])
if token == '' then
  if holder then return {'locked', redis.call('PTTL', KEYS[2])} end
elseif holder ~= token then
  return {'lost', 0}
end
"""

# KEYS: meta, lock, new chunks (n_new), old chunks (as the caller read them).
# ARGV: seen_gen, new_gen, expected_version ('' = any), token, ttl_ms (0 = none), n_new, size,
#       header, chunk_grace_ms.
COMMIT = Script(
    "commit",
    """
local cur_gen = redis.call('HGET', KEYS[1], 'g') or ''
local cur_ver = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if cur_gen == ARGV[2] then return {'ok', cur_ver} end
local token = ARGV[4]
"""
    + _LEASE_CHECK
    + """
if ARGV[3] ~= '' and tonumber(ARGV[3]) ~= cur_ver then return {'conflict', cur_ver} end
if cur_gen ~= ARGV[1] then return {'retry', cur_ver} end
local n_new = tonumber(ARGV[6])
for i = 3, 2 + n_new do
  if redis.call('EXISTS', KEYS[i]) == 0 then return {'missing', i - 3} end
end
for i = 3 + n_new, #KEYS do redis.call('UNLINK', KEYS[i]) end
local ttl = tonumber(ARGV[5])
for i = 3, 2 + n_new do
  if ttl > 0 then redis.call('PEXPIRE', KEYS[i], ttl + tonumber(ARGV[9]))
  else redis.call('PERSIST', KEYS[i]) end
end
redis.call('DEL', KEYS[1])
local v = cur_ver + 1
redis.call('HSET', KEYS[1], 'v', v, 'g', ARGV[2], 'n', n_new, 's', ARGV[7], 'h', ARGV[8])
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
return {'ok', v}
""",
)

# KEYS: meta, lock, chunks (as read). ARGV: seen_gen, expected_version ('' = any), token.
DELETE = Script(
    "delete",
    """
local cur_gen = redis.call('HGET', KEYS[1], 'g') or ''
local cur_ver = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
local token = ARGV[3]
"""
    + _LEASE_CHECK
    + """
if ARGV[2] ~= '' and tonumber(ARGV[2]) ~= cur_ver then return {'conflict', cur_ver} end
if cur_gen == '' then return {'missing', 0} end
if cur_gen ~= ARGV[1] then return {'retry', cur_ver} end
for i = 3, #KEYS do redis.call('UNLINK', KEYS[i]) end
redis.call('DEL', KEYS[1])
return {'ok', cur_ver}
""",
)

# KEYS: meta, chunks (as read). ARGV: seen_gen, ttl_ms (0 = remove the TTL), chunk_grace_ms.
# Returns 1 done, 0 no such session, -1 the value changed meanwhile (re-read and retry).
TOUCH = Script(
    "touch",
    """
local cur_gen = redis.call('HGET', KEYS[1], 'g')
if not cur_gen then return 0 end
if cur_gen ~= ARGV[1] then return -1 end
local ttl = tonumber(ARGV[2])
for i = 1, #KEYS do
  if ttl > 0 then
    local t = ttl
    if i > 1 then t = ttl + tonumber(ARGV[3]) end
    redis.call('PEXPIRE', KEYS[i], t)
  else
    redis.call('PERSIST', KEYS[i])
  end
end
return 1
""",
)

# KEYS: lock. ARGV: token, ttl_ms. Returns {1, 0} taken (or already ours), {0, pttl} held by another.
ACQUIRE = Script(
    "acquire",
    """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return {1, 0} end
if holder then return {0, redis.call('PTTL', KEYS[1])} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {1, 0}
""",
)

# KEYS: lock. ARGV: token, ttl_ms. Returns 1 renewed, 0 not held by this token.
RENEW = Script(
    "renew",
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
""",
)

# Compare-and-delete. KEYS: lock. ARGV: token. Returns 1 released, 0 free, -1 another owner holds it.
RELEASE = Script(
    "release",
    """
local holder = redis.call('GET', KEYS[1])
if not holder then return 0 end
if holder ~= ARGV[1] then return -1 end
redis.call('DEL', KEYS[1])
return 1
""",
)
