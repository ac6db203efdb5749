-- Sends node ARGV[2] every member of room ARGV[1] (`S`), in its stream.
-- KEYS: members hash.
local members = {}
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do table.insert(members, cjson.decode(v)) end
local ev = { t = 'S', r = ARGV[1] }
if #members > 0 then ev.m = members end
redis.call('PUBLISH', 'pl:n:' .. ARGV[2], cjson.encode(ev))
return #members
