-- flagd-ecs.lua: Fluent Bit Lua filter that maps one flagd event (EVE-shaped, already parsed
-- by the flagd_json parser) to ECS names, as in the table in shipping/README.md.
-- @timestamp is not set here: the es output writes it from the record's time (Time_Key).
-- Plain Lua 5.1 (Fluent Bit's LuaJIT) and 5.4 both run it.

local function is_address(s)
  -- anonymized events carry "anon-<hex>" pseudonyms, which an ECS ip field would reject
  return type(s) == "string" and s:match("^[0-9A-Fa-f:.]+$") ~= nil
end

local hostname
local function this_host()
  if hostname == nil then
    local f = io.open("/proc/sys/kernel/hostname", "r")
    hostname = f and f:read("*l") or "unknown"
    if f then f:close() end
  end
  return hostname
end

function flagd_ecs(tag, timestamp, eve)
  if eve.event_type == nil then
    -- Not a flagd event (tail keeps a line the parser rejected under "log"): forward it
    -- raw and tagged rather than drop it.
    return 2, timestamp, {
      event = {module = "flagd", dataset = "flagd.unparsed", original = eve.log},
      error = {message = "flagd event line is not a JSON object"},
      tags = "flagd_parse_failure",
      observer = {name = this_host()},
    }
  end

  local out = {event = {module = "flagd", dataset = "flagd." .. eve.event_type}}
  if eve.event_type == "stats" then
    out.event.kind = "metric"
  else
    out.event.kind = "event"
    out.event.category = "network"
  end
  -- the sensor that wrote the event; this host's name if an event lacks one
  out.observer = {name = eve.sensor or this_host()}

  if eve.flow_id ~= nil then
    out.flow = {id = eve.flow_id}
    out.source = {address = eve.src_ip, port = eve.src_port}
    if is_address(eve.src_ip) then out.source.ip = eve.src_ip end
    out.destination = {address = eve.dest_ip, port = eve.dest_port}
    if is_address(eve.dest_ip) then out.destination.ip = eve.dest_ip end
    out.network = {transport = string.lower(eve.proto), community_id = eve.community_id}
  end

  -- flag{} becomes flagd.* unchanged, so new keys travel too
  if type(eve.flag) == "table" then
    out.flagd = eve.flag
  end

  local f = eve.flow
  if type(f) == "table" then
    out.source.packets, out.source.bytes = f.pkts_toserver, f.bytes_toserver
    out.destination.packets, out.destination.bytes = f.pkts_toclient, f.bytes_toclient
    out.network.packets = f.pkts_toserver + f.pkts_toclient
    out.network.bytes = f.bytes_toserver + f.bytes_toclient
    out.event.start, out.event["end"] = f.start, f["end"]
    out.flagd = out.flagd or {}
    out.flagd.flow = {age = f.age, state = f.state, reason = f.reason}
  end

  if type(eve.stats) == "table" then
    out.flagd = out.flagd or {}
    out.flagd.stats = eve.stats
  end
  return 2, timestamp, out
end
