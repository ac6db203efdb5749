-- Removes a member if it is there and belongs to node `owner`, and tells
-- the other nodes with members in the room (`l`); the owner tells its own.
-- Returns 1 if removed, 0 if not there, "moved:NODE" if another node (or,
-- given a connection token, another connection of this node) has it now.
-- KEYS: members hash, join counter. ARGV: room, peer, owner, connection
-- token ("" for any connection of the owner).
local cur = redis.call('HGET', KEYS[1], ARGV[2])
if not cur then return 0 end
-- Another node's now (it resumed there): say which, and leave it be.
local e = cjson.decode(cur)
if e.node ~= ARGV[3] or (ARGV[4] ~= '' and e.c ~= nil and e.c ~= ARGV[4]) then
  return 'moved:' .. e.node
end
redis.call('HDEL', KEYS[1], ARGV[2])
local rest = redis.call('HVALS', KEYS[1])
if #rest == 0 then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 1
end
local nodes = {}
for _, v in ipairs(rest) do
  local e = cjson.decode(v)
  if e.node ~= ARGV[3] then nodes[e.node] = true end
end
local ev = cjson.encode({ t = 'l', r = ARGV[1], p = ARGV[2] })
for other in pairs(nodes) do redis.call('PUBLISH', 'pl:n:' .. other, ev) end
return 1
