-- Adds a member to a room, unless it is there already or (mode "join")
-- the room is full. Tells the other nodes with members in the room (`j`)
-- and, for a join, the joiner's own node (`J`, every member, so the
-- joiner's `joined` takes its place in the node's one ordered stream).
-- Mode "resume": a member already there (a client that reconnected to
-- this node) moves here, keeping its place; every other node with members
-- in the room, its old node included, hears `j` with its new node, and
-- this node gets `J`. Anyone else is added as by "join".
-- Mode "resume-only": the same, but "gone" if the member is not there (a
-- resume without a valid join token may take back a place, nothing more).
-- KEYS: members hash, join counter (one hash slot: {room}).
-- ARGV: room, peer, node, has name ("1"/"0"), name, max members, mode
-- ("join", "resume", "resume-only" or "restore"), the connection's token
-- on its node (kept as `c`: a leave removes only its own connection's).
local room, peer, node = ARGV[1], ARGV[2], ARGV[3]
local max, mode = tonumber(ARGV[6]), ARGV[7]
local me
local cur = redis.call('HGET', KEYS[1], peer)
if cur then
  if mode == 'restore' then return 'present' end
  if mode ~= 'resume' and mode ~= 'resume-only' then return 'already' end
  me = cjson.decode(cur)
  me.node = node
  me.c = ARGV[8]
elseif mode == 'resume-only' then
  return 'gone'
else
  local n = redis.call('HLEN', KEYS[1])
  if mode ~= 'restore' and n >= max then return 'full:' .. n end
  local since = redis.call('INCR', KEYS[2])
  me = { id = peer, node = node, s = since, c = ARGV[8] }
  if ARGV[4] == '1' then me.n = ARGV[5] end
end
redis.call('HSET', KEYS[1], peer, cjson.encode(me))
local members, nodes = {}, {}
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do
  local e = cjson.decode(v)
  table.insert(members, e)
  if e.node ~= node then nodes[e.node] = true end
end
if cur then nodes[cjson.decode(cur).node] = true end
nodes[node] = nil
local ev = cjson.encode({ t = 'j', r = room, m = { me } })
for other in pairs(nodes) do redis.call('PUBLISH', 'pl:n:' .. other, ev) end
if mode ~= 'restore' then
  local ev = { t = 'J', r = room, p = peer, m = members }
  if cur then ev.k = true end
  redis.call('PUBLISH', 'pl:n:' .. node, cjson.encode(ev))
end
return 'ok'
