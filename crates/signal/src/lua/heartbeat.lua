-- Renews node ARGV[1]'s lease for ARGV[2] ms (Redis's clock, so nodes'
-- clocks do not matter). Returns "1" if the node had no live lease (first
-- beat, Redis lost its data, or the lease ran out: its members may be
-- gone), else "0", followed by the nodes whose leases ran out.
-- KEYS: the leases sorted set.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prev = redis.call('ZSCORE', KEYS[1], ARGV[1])
local fresh = (not prev) or tonumber(prev) < now
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
table.insert(dead, 1, fresh and '1' or '0')
return dead
