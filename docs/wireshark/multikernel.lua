-- Wireshark / tshark dissector for multikernel bus captures (`mkctl bus capture FILE`).
--
-- A capture is pcapng with link type USER0 (147). Each packet is the capture pseudo-header
-- (what the hub recorded about the frame: endpoints/mkctl/_pcapng.py documents it) followed by
-- one envelope frame: the 48-byte header of docs/protocol.md section 1.1, the subject, and the
-- msgpack body. Use it with
--
--     tshark -X lua_script:docs/wireshark/multikernel.lua -r capture.pcapng -V
--     wireshark -X lua_script:docs/wireshark/multikernel.lua capture.pcapng
--
-- or copy it to ~/.local/lib/wireshark/plugins/. Display filters: `multikernel.kind == 1`,
-- `multikernel.subject contains "instance"`, `mkcap.service == "lifecycle"`.

local mkcap = Proto("mkcap", "multikernel capture pseudo-header")
local mk = Proto("multikernel", "multikernel bus envelope")

local paths = { [1] = "hub", [2] = "direct" }
local kinds = { [1] = "PUBLISH", [2] = "REQUEST", [3] = "REPLY", [4] = "ERROR", [5] = "CONTROL" }

local c = {
    magic = ProtoField.string("mkcap.magic", "Magic"),
    path = ProtoField.uint8("mkcap.path", "Path", base.DEC, paths),
    source_name_len = ProtoField.uint8("mkcap.source_name_len", "Source name length"),
    service_len = ProtoField.uint16("mkcap.service_len", "Service length"),
    source = ProtoField.uint64("mkcap.source", "Source endpoint"),
    destination = ProtoField.uint64("mkcap.destination", "Destination endpoint"),
    channel = ProtoField.uint64("mkcap.channel", "Direct channel"),
    monotonic = ProtoField.uint64("mkcap.monotonic_ns", "CLOCK_MONOTONIC (ns)"),
    source_name = ProtoField.string("mkcap.source_name", "Source name"),
    service = ProtoField.string("mkcap.service", "Service"),
}
mkcap.fields = c

local f = {
    magic = ProtoField.uint16("multikernel.magic", "Magic", base.HEX),
    version = ProtoField.uint8("multikernel.version", "Version"),
    kind = ProtoField.uint8("multikernel.kind", "Kind", base.DEC, kinds),
    flags = ProtoField.uint16("multikernel.flags", "Flags", base.HEX),
    subject_len = ProtoField.uint16("multikernel.subject_len", "Subject length"),
    body_len = ProtoField.uint32("multikernel.body_len", "Body length"),
    reserved = ProtoField.uint32("multikernel.reserved", "Reserved"),
    source = ProtoField.uint64("multikernel.source", "Source"),
    destination = ProtoField.uint64("multikernel.destination", "Destination"),
    correlation = ProtoField.uint64("multikernel.correlation", "Correlation"),
    deadline = ProtoField.uint64("multikernel.deadline_ns", "Deadline (CLOCK_MONOTONIC ns)"),
    subject = ProtoField.string("multikernel.subject", "Subject"),
    body = ProtoField.bytes("multikernel.body", "Body (msgpack)"),
}
mk.fields = f

function mk.dissector(buffer, pinfo, tree)
    if buffer:len() < 48 or buffer(0, 2):le_uint() ~= 0x4B4D then
        return 0
    end
    pinfo.cols.protocol = "multikernel"
    local subject_len = buffer(6, 2):le_uint()
    local body_len = buffer(8, 4):le_uint()
    local kind = buffer(3, 1):uint()
    local t = tree:add(mk, buffer(), "multikernel envelope")
    t:add_le(f.magic, buffer(0, 2))
    t:add(f.version, buffer(2, 1))
    t:add(f.kind, buffer(3, 1))
    t:add_le(f.flags, buffer(4, 2))
    t:add_le(f.subject_len, buffer(6, 2))
    t:add_le(f.body_len, buffer(8, 4))
    t:add_le(f.reserved, buffer(12, 4))
    t:add_le(f.source, buffer(16, 8))
    t:add_le(f.destination, buffer(24, 8))
    t:add_le(f.correlation, buffer(32, 8))
    t:add_le(f.deadline, buffer(40, 8))
    local subject = ""
    if subject_len > 0 and buffer:len() >= 48 + subject_len then
        subject = buffer(48, subject_len):string()
        t:add(f.subject, buffer(48, subject_len))
    end
    if body_len > 0 and buffer:len() >= 48 + subject_len + body_len then
        t:add(f.body, buffer(48 + subject_len, body_len))
    end
    pinfo.cols.info = string.format("%s %s (%d bytes)", kinds[kind] or "?", subject, body_len)
    return buffer:len()
end

function mkcap.dissector(buffer, pinfo, tree)
    if buffer:len() < 40 or buffer(0, 4):string() ~= "MKCP" then
        return 0
    end
    local name_len = buffer(5, 1):uint()
    local service_len = buffer(6, 2):le_uint()
    local t = tree:add(mkcap, buffer(0, 40), "multikernel capture")
    t:add(c.magic, buffer(0, 4))
    t:add(c.path, buffer(4, 1))
    t:add(c.source_name_len, buffer(5, 1))
    t:add_le(c.service_len, buffer(6, 2))
    t:add_le(c.source, buffer(8, 8))
    t:add_le(c.destination, buffer(16, 8))
    t:add_le(c.channel, buffer(24, 8))
    t:add_le(c.monotonic, buffer(32, 8))
    if name_len > 0 then
        t:add(c.source_name, buffer(40, name_len))
    end
    if service_len > 0 then
        t:add(c.service, buffer(40 + name_len, service_len))
    end
    local names_end = 40 + name_len + service_len
    local frame_at = names_end + ((8 - names_end % 8) % 8)
    if buffer:len() > frame_at then
        mk.dissector:call(buffer(frame_at):tvb(), pinfo, tree)
    end
    return buffer:len()
end

DissectorTable.get("wtap_encap"):add(wtap.USER0, mkcap)
