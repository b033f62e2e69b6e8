/*
 * provbridge_jwt: a Mosquitto 2.0 plugin that verifies provbridge device tokens itself, as the
 * embedded broker does (broker/auth.py, broker/tokens.py, broker/acl.py), so the bridge need not
 * mirror each token into the dynamic-security plugin.
 *
 *   plugin /path/provbridge_jwt.so          before the dynamic-security plugin line
 *   plugin_opt_jwks_file /data/jwks.json    the keys that sign device tokens (re-read when changed)
 *   plugin_opt_denylist_file /data/denylist.json   credentials refused (re-read when changed)
 *   plugin_opt_audience provbridge-mqtt
 *   plugin_opt_issuer provbridge
 *   plugin_opt_bridge_username provbridge-bridge   the bridge's account: never publish-limited
 *   plugin_opt_publish_rate 10      publishes a second per client id (0 or absent: no limit)
 *   plugin_opt_publish_burst 20     the bucket's size
 *   plugin_opt_topic_prefix prov/v1   device presence is published under it (absent: none)
 *
 * CONNECT with a username shaped like a device id (dev_ + 26 base32 letters): this plugin decides,
 * success or refusal, never deferring. The password must be an ES256 JWT whose header `kid` names a
 * key of the JWKS; claims as PyJWT checks them (exp, iss, aud, sub required; iat/nbf not in the
 * future; jti a string), sub == username == client id, an `acl` object with `pub`/`sub` lists of
 * topic filters, `gen` (the credential generation) absent or a whole number >= 0, and the token not
 * refused by the denylist. Every other CONNECT is deferred to the next plugin (dynamic security: the
 * bridge, provisioning and ops accounts).
 *
 * The denylist (broker/denylist.py: format, rules) refuses a credential of a device until a time: every
 * one of a revoked or deleted device ("devices"), and those a device held before it was reinstated or
 * reset ("older_credentials": tokens whose gen is below the device's generation, certificates by serial
 * number). Each session keeps its credential (gen or serial) and the until of the entries refusing it,
 * computed at CONNECT and again for every session whenever the file changes.
 *
 * ACL checks of sessions it authenticated: publish if the topic matches acl.pub, subscribe if the
 * filter is covered by an acl.sub filter, delivery if the topic matches acl.sub; everything denied
 * once exp has passed or while the denylist refuses the session's credential. Once a second (on the
 * broker's tick) the files are checked for changes and sessions whose token expired or whose
 * credential the denylist refuses are kicked.
 *
 * CONNECT of a client with a TLS client certificate (mosquitto_client_certificate non-NULL: only on the
 * device-certificate listener, `require_certificate true`, whose `cafile` is the device CA alone, so the
 * handshake has verified the chain, validity and clientAuth): this plugin decides, never deferring. The
 * certificate is the credential, the password is ignored: the subject's one CN must be a device id and
 * equal the username and the client id; the scope extension (SCOPE_OID: a DER UTF8String of compact JSON
 * {"pub":[filters],"sub":[filters]}) must be there once and exactly that (broker/certificates.py, same
 * rules and reasons); notAfter still ahead; the certificate not refused by the denylist (its device
 * revoked, or its serial number, lowercase hex as Python's format(n, "x"), in the device's
 * older_credentials). The session then holds the scope as its acl and notAfter as its exp: every ACL check,
 * the tick's kick and the denylist work as for a token. The listener does NOT set
 * `use_identity_as_username`, on purpose: Mosquitto 2.0.11 then skips every basic-auth check
 * ("Authentication assumed to be cleared", src/handle_connect.c), so a revoked device could only be
 * refused packet by packet; without it the basic-auth event comes, with the certificate, and a revoked
 * or malformed device is refused at CONNECT.
 *
 * Publish limit (plugin_opt_publish_rate > 0): every PUBLISH (MOSQ_ACL_WRITE) of a client that is
 * neither the bridge's own account (plugin_opt_bridge_username) nor a device this plugin let in,
 * i.e. provisioning clients (anyone may connect as one) and ops, takes a token from a bucket keyed by its client id (rate tokens a second, at most burst, on
 * CLOCK_MONOTONIC); with none left the check says MOSQ_ERR_ACL_DENIED: Mosquitto drops the message
 * (an MQTT 5 PUBACK says "not authorized") before anything else reads it. Mosquitto 2.0 has no
 * per-client publish rate of its own: without this a flooder is read as fast as it sends, and the
 * bridge's own, tighter limit (its rate_limited answer) only comes after the flood was carried.
 * Delivery and SUBSCRIBE checks never take a token. A bucket is forgotten once it has refilled
 * (a full bucket is the same as none): on DISCONNECT, and by the once-a-second sweep, so the table
 * holds only clients that published in the last burst/rate seconds and a reconnect does not reset a
 * debt. At most RATE_MAX_CLIENTS are tracked; beyond, a new client id is let through untracked
 * (logged): refusing would hand whoever fills the table a way to silence every other client, and the
 * bridge's own limit still answers such a client.
 *
 * Device presence (plugin_opt_topic_prefix given), as the embedded broker announces it (broker/server.py
 * `_announce_presence`): once a device's CONNECT is accepted (token or certificate: where its session is
 * added) the plugin publishes `online` on {prefix}/presence/{device id}, and `offline` when that session ends
 * (DISCONNECT, which the tick's kicks raise too); QoS 0, not retained, to every subscriber allowed to read it
 * (the bridge, which records it, and ops). A CONNECT that takes over a device's client id is accepted before
 * Mosquitto ends the old session: that end says nothing, so the last word is `online`. Only devices this
 * plugin let in are announced. No client is let publish there by the bridge's and ops' roles or the
 * provisioning acl_file (bridge/mosquitto/conf.py); a device is held to its own scope, as everywhere.
 *
 * Tokens are never logged: only the device id and the reason.
 *
 * The reference is the embedded broker (PyJWT 2.x and broker/acl.py): every decision here, with its
 * reason, must equal its decision. tests/test_jwt_plugin_differential.py checks that on generated
 * tokens, JWKS and denylist files, topics and filters through harness.c, under AddressSanitizer,
 * UBSan and LeakSanitizer; the few places where this plugin is deliberately stricter are listed
 * there (JSON that is not JSON or holds a NUL, a time claim that is a string, passwords over
 * MAX_TOKEN_BYTES), all but the last needing the signing key; and one looser, in a file only the bridge
 * writes: a denylist number written 1.0 or 1e3 is read as the whole number (cJSON keeps no difference).
 * Library calls do the work wherever they are exact: OpenSSL (keys, ECDSA, serial numbers), cJSON
 * (parsing), libmosquitto (topic matching). What is left is hand-written because no library call gives
 * the reference's exact answer; each part says why.
 */

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>

#include <cjson/cJSON.h>
#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/x509.h>

#define LOG_PREFIX "provbridge_jwt: "
#define BUCKETS 4096
#define MAX_FILE_BYTES (64L * 1024 * 1024)
#define MAX_TOKEN_BYTES 16384
#define DEVICE_ID_LEN 30 /* "dev_" + 26 */
#define RATE_BUCKETS 4096
#define RATE_MAX_CLIENTS 65536
/* Client ids longer than this share a bucket with those of the same first bytes: no legitimate
 * client's is this long (provisioning client ids are at most 64, device ids 30). */
#define RATE_KEY_MAX 256

#define NOT_A_JWT "password is not a JWT"
/* The device-certificate scope extension (broker/certificates.py SCOPE_OID). */
#define SCOPE_OID "2.25.17966235642987300532048389404304313540"
#define NOT_UTF8STRING "scope extension is not a DER UTF8String"
#define BAD_CN "certificate CN is not one device id"

/* --- state ------------------------------------------------------------------------------- */

struct watched {
	char *path;
	bool present;
	dev_t dev;
	ino_t ino;
	off_t size;
	struct timespec mtime;
};

struct key {
	char *kid;
	EVP_PKEY *pkey;
};

/* One device's entry in the denylist (broker/denylist.py), of "devices" or of "older_credentials".
 * Each table is sorted by device id, one entry a device: the last of a repeated name, as a Python dict keeps. */
struct denied {
	const char *device_id; /* a member name in the loaded document (plugin.denylist) */
	size_t order;          /* its position there, so that the last of a repeated name wins */
	const cJSON *value;    /* its value there: an until, or an older_credentials object */
	long long until;
	double generation;         /* older_credentials: tokens whose gen is below it are refused */
	const cJSON *certificates; /* older_credentials: the serials refused, an array of strings; NULL: none */
};

/* What a device session holds, as the denylist judges it (broker/denylist.py `Credential`). */
struct credential {
	const char *device_id;
	double generation;  /* a token's gen (absent: 0), validated whole and >= 0 */
	const char *serial; /* a certificate's serial number (lowercase hex, format(n, "x")); NULL for a token */
};

/* One authenticated device session, keyed by its Mosquitto context. */
struct session {
	const struct mosquitto *client;
	char device_id[DEVICE_ID_LEN + 1];
	long long exp;
	long long denied_until; /* until when the denylist refuses its credential (0: it does not) */
	bool kicked;
	bool certificate; /* authenticated by a client certificate: exp is its notAfter */
	double generation; /* a token's gen: kept to judge the credential again when the denylist changes */
	char *serial;      /* a certificate's serial number, for the same (NULL for a token) */
	cJSON *acl; /* the token's acl object (a certificate's scope): "pub" and "sub" arrays of valid filters */
	struct session *next;
	struct session *next_of_device; /* the chain of plugin.devices: sessions by device id */
};

/* A publish token bucket, keyed by client id (the first RATE_KEY_MAX bytes). */
struct rate_entry {
	struct rate_entry *next;
	double tokens;
	double last; /* CLOCK_MONOTONIC seconds of the last refill */
	bool logged;
	char client_id[]; /* NUL-terminated, at most RATE_KEY_MAX bytes before it */
};

struct plugin {
	mosquitto_plugin_id_t *pid;
	char *audience;
	char *issuer;
	char *bridge_username;
	char *topic_prefix; /* plugin_opt_topic_prefix; NULL: no presence published */
	char *presence_topic; /* "{topic_prefix}/presence/" then room for a device id; NULL when presence is off */
	size_t presence_head; /* where the device id goes in presence_topic */
	double publish_rate; /* tokens a second; 0: no publish limit */
	double publish_burst;
	uint32_t rate_seed;
	size_t rate_count;
	double rate_full_logged;
	struct rate_entry *rate_buckets[RATE_BUCKETS];
	/* The last good content of each file stays loaded while the file is unparsable, as
	 * broker/watched.py keeps it (a corrupt JWKS must not lock every device out, a corrupt denylist
	 * must not un-revoke devices); it is not used while the file is missing (`present` false). */
	struct watched jwks_file;
	struct watched denylist_file;
	struct key *keys;
	size_t key_count;
	cJSON *denylist; /* the last good denylist document: the tables point into it */
	struct denied *revoked; /* "devices": every credential of the device refused */
	size_t revoked_count;
	struct denied *older; /* "older_credentials": the credentials from before a reinstatement or reset */
	size_t older_count;
	time_t last_sweep;
	size_t sessions;
	struct session *buckets[BUCKETS];
	/* The same sessions by device id: two at once only while a CONNECT takes over a device's client id. */
	struct session *devices[BUCKETS];
};

/* --- small helpers ----------------------------------------------------------------------- */

static double now_seconds(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double monotonic_seconds(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static bool is_device_id(const char *s)
{
	if(s == NULL || strlen(s) != DEVICE_ID_LEN || strncmp(s, "dev_", 4) != 0) return false;
	for(const char *c = s + 4; *c; c++){
		if(!((*c >= 'a' && *c <= 'z') || (*c >= '2' && *c <= '7'))) return false;
	}
	return true;
}

/* --- base64url ---------------------------------------------------------------------------
 * Hand-written: the reference is PyJWT's `_decode_base64url_segment`, which takes unpadded
 * base64url, or padded with one or two `=` when the padded length is a multiple of 4, and refuses
 * any other character and any non-canonical encoding (unused low bits not zero, so a signature has
 * exactly one spelling). OpenSSL's decoder (EVP_DecodeBlock) reads the standard alphabet, skips
 * whitespace and ignores the unused bits: it would need every one of these checks around it. */

static int b64url_value(char c)
{
	if(c >= 'A' && c <= 'Z') return c - 'A';
	if(c >= 'a' && c <= 'z') return c - 'a' + 26;
	if(c >= '0' && c <= '9') return c - '0' + 52;
	if(c == '-') return 62;
	if(c == '_') return 63;
	return -1;
}

/* Returns a malloc'd buffer of *out_len bytes followed by a NUL, or NULL if `in` is not one. */
static unsigned char *b64url_decode(const char *in, size_t len, size_t *out_len)
{
	size_t padding = 0;
	while(padding < len && in[len - 1 - padding] == '='){
		if(++padding > 2) return NULL;
	}
	if(padding > 0 && len % 4 != 0) return NULL;
	len -= padding;
	if(len % 4 == 1) return NULL;
	unsigned char *out = malloc(len / 4 * 3 + 3); /* 3 bytes per 4 characters, 2 for a tail, the NUL */
	if(out == NULL) return NULL;
	size_t n = 0;
	unsigned int acc = 0;
	int bits = 0;
	for(size_t i = 0; i < len; i++){
		int v = b64url_value(in[i]);
		if(v < 0){
			free(out);
			return NULL;
		}
		acc = ((acc << 6) | (unsigned int)v) & 0xFFFFFFu;
		bits += 6;
		if(bits >= 8){
			bits -= 8;
			out[n++] = (unsigned char)((acc >> bits) & 0xFF);
		}
	}
	if((acc & ((1u << bits) - 1)) != 0){ /* non-canonical: the leftover bits must be zero */
		free(out);
		return NULL;
	}
	out[n] = '\0';
	*out_len = n;
	return out;
}

/* --- JSON ---------------------------------------------------------------------------------
 * cJSON parses; this gate first refuses what Python's json.loads refuses but cJSON takes, so both
 * sides read the same documents: bytes that are not strict UTF-8 (Python decodes first), control
 * characters in strings, whitespace other than space, tab, CR, LF (cJSON skips any byte <= 32),
 * numbers outside the JSON grammar (cJSON hands `+1`, `01`, `.5`, `1.` to strtod), a \u escape that
 * is not four hex digits (cJSON reads it as U+0000, ending the string there). Trailing data
 * is refused by cJSON itself (require_null_terminated). Stricter than Python, deliberately: a NUL,
 * raw or as \u0000 (cJSON strings end at NUL, so "dev_a\u0000x" would read as "dev_a"), numbers
 * longer than JSON_NUMBER_MAX characters (cJSON before 1.7.16, unpatched, cannot read them: refusing
 * them here keeps the answer the same whatever the cJSON build), and NaN/Infinity (not JSON, RFC 8259;
 * cJSON refuses them anyway). */

#define JSON_NUMBER_MAX 63

/* The length of the strict UTF-8 sequence at s (as Python's decoder accepts it), 0 if invalid. */
static size_t utf8_sequence(const unsigned char *s, size_t n)
{
	unsigned char c = s[0];
	size_t len;
	unsigned char lo = 0x80, hi = 0xBF; /* the range of the second byte */
	if(c < 0x80) return 1;
	if(c >= 0xC2 && c <= 0xDF) len = 2;
	else if(c >= 0xE0 && c <= 0xEF){
		len = 3;
		if(c == 0xE0) lo = 0xA0;      /* overlong */
		else if(c == 0xED) hi = 0x9F; /* UTF-16 surrogates */
	}else if(c >= 0xF0 && c <= 0xF4){
		len = 4;
		if(c == 0xF0) lo = 0x90;      /* overlong */
		else if(c == 0xF4) hi = 0x8F; /* beyond U+10FFFF */
	}else return 0;
	if(n < len || s[1] < lo || s[1] > hi) return 0;
	for(size_t i = 2; i < len; i++){
		if(s[i] < 0x80 || s[i] > 0xBF) return 0;
	}
	return len;
}

static bool is_number_char(unsigned char c)
{
	return (c >= '0' && c <= '9') || c == '+' || c == '-' || c == 'e' || c == 'E' || c == '.';
}

/* Whether s[0..n) is exactly a JSON number: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)? */
static bool json_number(const unsigned char *s, size_t n)
{
	size_t i = 0;
	if(i < n && s[i] == '-') i++;
	if(i < n && s[i] == '0') i++;
	else if(i < n && s[i] >= '1' && s[i] <= '9'){
		while(i < n && s[i] >= '0' && s[i] <= '9') i++;
	}else return false;
	if(i < n && s[i] == '.'){
		size_t digits = ++i;
		while(i < n && s[i] >= '0' && s[i] <= '9') i++;
		if(i == digits) return false;
	}
	if(i < n && (s[i] == 'e' || s[i] == 'E')){
		i++;
		if(i < n && (s[i] == '+' || s[i] == '-')) i++;
		size_t digits = i;
		while(i < n && s[i] >= '0' && s[i] <= '9') i++;
		if(i == digits) return false;
	}
	return i == n;
}

static bool is_hex4(const unsigned char *s)
{
	for(int i = 0; i < 4; i++){
		if(!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f') || (s[i] >= 'A' && s[i] <= 'F'))) return false;
	}
	return true;
}

static bool json_text_ok(const unsigned char *s, size_t n)
{
	bool in_string = false;
	size_t i = 0;
	while(i < n){
		unsigned char c = s[i];
		if(c >= 0x80){
			size_t len = utf8_sequence(s + i, n - i);
			if(len == 0) return false;
			i += len;
		}else if(in_string){
			if(c < 0x20) return false;
			if(c == '"') in_string = false;
			if(c == '\\'){
				if(i + 1 >= n || s[i + 1] >= 0x80) return false; /* cJSON would refuse it too */
				if(s[i + 1] == 'u'){
					/* Four hex digits, as Python requires: cJSON reads a bad \u escape as U+0000 (parse_hex4
					 * answers 0), which would end the string there. */
					if(n - i < 6 || !is_hex4(s + i + 2) || memcmp(s + i + 2, "0000", 4) == 0) return false;
				}
				i++; /* the escaped character: `\"` does not end the string */
			}
			i++;
		}else if(c == '"'){
			in_string = true;
			i++;
		}else if(c == '-' || (c >= '0' && c <= '9')){
			size_t start = i;
			while(i < n && is_number_char(s[i])) i++;
			if(i - start > JSON_NUMBER_MAX || !json_number(s + start, i - start)) return false;
		}else{
			if(c < 0x20 && c != '\t' && c != '\n' && c != '\r') return false;
			i++;
		}
	}
	return true;
}

/* The JSON document text[0..n), where text[n] is a NUL; NULL unless it is one (see above). */
static cJSON *parse_json(const char *text, size_t n)
{
	if(!json_text_ok((const unsigned char *)text, n)) return NULL;
	return cJSON_ParseWithLengthOpts(text, n + 1, NULL, true);
}

/* JSON from base64url, as a JSON object; NULL if not. */
static cJSON *json_object_of(const unsigned char *raw, size_t n)
{
	cJSON *json = parse_json((const char *)raw, n);
	if(json != NULL && !cJSON_IsObject(json)){
		cJSON_Delete(json);
		return NULL;
	}
	return json;
}

/* The member `name` of `object`, the last one when a name repeats (Python's json keeps the last). */
static const cJSON *member(const cJSON *object, const char *name)
{
	const cJSON *found = NULL, *item;
	if(!cJSON_IsObject(object)) return NULL;
	cJSON_ArrayForEach(item, object){
		if(item->string != NULL && strcmp(item->string, name) == 0) found = item;
	}
	return found;
}

static bool string_is(const cJSON *value, const char *expected)
{
	return value != NULL && cJSON_IsString(value) && strcmp(value->valuestring, expected) == 0;
}

/* A whole number as broker/acl.py takes a token's gen, and as broker/denylist.py `_is_int` takes a number:
 * a finite JSON number of integral value. For the denylist, 1.0 and 1e3 too, which Python reads as floats
 * and `_is_int` refuses: cJSON keeps no difference (a deliberate difference, see the test's docstring). */
static bool whole_number(const cJSON *value)
{
	return cJSON_IsNumber(value) && isfinite(value->valuedouble) && value->valuedouble == floor(value->valuedouble);
}

static bool string_list(const cJSON *value)
{
	const cJSON *item;
	if(!cJSON_IsArray(value)) return false;
	cJSON_ArrayForEach(item, value){
		if(!cJSON_IsString(item)) return false;
	}
	return true;
}

/* Python's int(x) of a JSON number: truncation toward zero, clamped to avoid overflow. */
static long long truncated(double value)
{
	if(value >= 9e18) return 9000000000000000000LL;
	if(value <= -9e18) return -9000000000000000000LL;
	return (long long)value;
}

/* --- topics: provwire/topics.py and broker/acl.py ----------------------------------------
 * The validity rules are provwire's, hand-written because libmosquitto's mosquitto_sub_topic_check
 * knows nothing of `$share/<group>/` (provwire needs a literal, non-empty group and a filter after
 * it) and adds a 65535-byte limit the reference does not have. Matching a topic is libmosquitto's
 * own mosquitto_topic_matches_sub (exported by the broker), exact for valid input: `a/#` matches
 * `a`, `+` matches one level (an empty one too), wildcards in the first level skip `$` topics.
 * Coverage of a filter by a filter is hand-written: Mosquitto 2.0 has no call for it
 * (mosquitto_sub_matches_acl came with 2.1), and broker/acl.py `filter_covers` also has the
 * shared-subscription rule. */

static bool is_valid_topic(const char *topic)
{
	return topic != NULL && topic[0] != '\0' && strpbrk(topic, "+#") == NULL;
}

static bool is_valid_filter(const char *filter)
{
	if(filter == NULL || filter[0] == '\0') return false;
	const char *level = filter;
	for(;;){
		const char *end = strchr(level, '/');
		size_t len = end ? (size_t)(end - level) : strlen(level);
		bool has_hash = memchr(level, '#', len) != NULL;
		bool has_plus = memchr(level, '+', len) != NULL;
		if(has_hash && (len != 1 || end != NULL)) return false;
		if(has_plus && len != 1) return false;
		if(end == NULL) break;
		level = end + 1;
	}
	if(strncmp(filter, "$share/", 7) == 0 || strcmp(filter, "$share") == 0){
		/* $share/<group>/<filter>: a literal, non-empty group and at least one more level */
		const char *group = filter + 7;
		if(strcmp(filter, "$share") == 0) return false;
		const char *slash = strchr(group, '/');
		if(slash == NULL) return false;
		size_t glen = (size_t)(slash - group);
		if(glen == 0 || (glen == 1 && (group[0] == '+' || group[0] == '#'))) return false;
	}
	return true;
}

static size_t level_len(const char *level)
{
	const char *end = strchr(level, '/');
	return end ? (size_t)(end - level) : strlen(level);
}

static bool level_is(const char *level, size_t len, const char *literal)
{
	return len == strlen(literal) && memcmp(level, literal, len) == 0;
}

static bool topic_matches(const char *filter, const char *topic)
{
	bool result = false;
	if(!is_valid_filter(filter) || !is_valid_topic(topic)) return false;
	return mosquitto_topic_matches_sub(filter, topic, &result) == MOSQ_ERR_SUCCESS && result;
}

/* For `$share/<group>/<rest>`: the group and rest, else false. */
static bool shared_parts(const char *filter, const char **group, size_t *group_len, const char **rest)
{
	if(strncmp(filter, "$share/", 7) != 0) return false;
	const char *g = filter + 7;
	const char *slash = strchr(g, '/');
	if(slash == NULL) return false;
	*group = g;
	*group_len = (size_t)(slash - g);
	*rest = slash + 1;
	return true;
}

/* acl.filter_covers: whether every topic `requested` can match is also matched by `allowed`. */
static bool filter_covers(const char *allowed, const char *requested)
{
	const char *ag, *arest, *rg, *rrest;
	size_t aglen, rglen;
	bool shared_a = shared_parts(allowed, &ag, &aglen, &arest);
	bool shared_r = shared_parts(requested, &rg, &rglen, &rrest);
	if(shared_a || shared_r){
		if(!shared_a || !shared_r || !is_valid_filter(requested)) return false;
		bool group_ok = level_is(ag, aglen, "+") || (aglen == rglen && memcmp(ag, rg, aglen) == 0);
		return group_ok && filter_covers(arest, rrest);
	}
	if(!is_valid_filter(allowed) || !is_valid_filter(requested)) return false;
	/* `$x/...` topics escape a leading wildcard, so `#` does not cover `$SYS/#`. */
	if(requested[0] == '$' && (level_is(allowed, level_len(allowed), "+") || level_is(allowed, level_len(allowed), "#"))){
		return false;
	}
	const char *a = allowed, *r = requested;
	for(;;){
		size_t alen = level_len(a);
		if(level_is(a, alen, "#")) return true;
		if(r == NULL) return false; /* `a/+` does not cover `a` */
		size_t rlen = level_len(r);
		if(level_is(r, rlen, "#")) return false; /* the request spans any depth from here */
		if(!level_is(a, alen, "+") && (alen != rlen || memcmp(a, r, alen) != 0)) return false;
		const char *anext = a[alen] == '/' ? a + alen + 1 : NULL;
		const char *rnext = r[rlen] == '/' ? r + rlen + 1 : NULL;
		if(anext == NULL) return rnext == NULL;
		a = anext;
		r = rnext;
	}
}

/* --- files ------------------------------------------------------------------------------- */

/* Whether the file changed (appeared, vanished, or another inode, size or mtime) since last time. */
static bool file_changed(struct watched *w)
{
	struct stat st;
	if(stat(w->path, &st) != 0){
		bool changed = w->present;
		w->present = false;
		return changed;
	}
	bool changed = !w->present || st.st_dev != w->dev || st.st_ino != w->ino || st.st_size != w->size
		|| st.st_mtim.tv_sec != w->mtime.tv_sec || st.st_mtim.tv_nsec != w->mtime.tv_nsec;
	w->present = true;
	w->dev = st.st_dev;
	w->ino = st.st_ino;
	w->size = st.st_size;
	w->mtime = st.st_mtim;
	return changed;
}

static cJSON *read_json(const char *path)
{
	FILE *f = fopen(path, "rb");
	if(f == NULL) return NULL;
	char *buf = NULL;
	cJSON *json = NULL;
	if(fseek(f, 0, SEEK_END) == 0){
		long size = ftell(f);
		if(size >= 0 && size <= MAX_FILE_BYTES && fseek(f, 0, SEEK_SET) == 0){
			buf = malloc((size_t)size + 1);
			if(buf != NULL && fread(buf, 1, (size_t)size, f) == (size_t)size){
				buf[size] = '\0';
				json = parse_json(buf, (size_t)size);
			}
		}
	}
	free(buf);
	fclose(f);
	return json;
}

static void free_key_array(struct key *keys, size_t count)
{
	for(size_t i = 0; i < count; i++){
		free(keys[i].kid);
		EVP_PKEY_free(keys[i].pkey);
	}
	free(keys);
}

static bool coordinate(const cJSON *jwk, const char *name, unsigned char *out32)
{
	const cJSON *value = member(jwk, name);
	if(!cJSON_IsString(value)) return false;
	size_t n;
	unsigned char *raw = b64url_decode(value->valuestring, strlen(value->valuestring), &n);
	bool ok = raw != NULL && n == 32;
	if(ok) memcpy(out32, raw, 32);
	free(raw);
	return ok;
}

/* An EC P-256 public key from a JWK (broker/tokens.py `_public_key`), or NULL with a reason. */
static EVP_PKEY *jwk_public_key(const cJSON *jwk, const char **reason)
{
	unsigned char point[65];
	const cJSON *alg = member(jwk, "alg"), *use = member(jwk, "use");
	if(!string_is(member(jwk, "kty"), "EC") || !string_is(member(jwk, "crv"), "P-256")){
		*reason = "not an EC P-256 key";
		return NULL;
	}
	if((alg != NULL && !string_is(alg, "ES256")) || (use != NULL && !string_is(use, "sig"))){
		*reason = "not an ES256 signing key";
		return NULL;
	}
	if(member(jwk, "d") != NULL){
		*reason = "holds private key material";
		return NULL;
	}
	point[0] = 0x04;
	if(!coordinate(jwk, "x", point + 1) || !coordinate(jwk, "y", point + 33)){
		*reason = "x and y must be 32 bytes of base64url";
		return NULL;
	}
	char group[] = "prime256v1";
	OSSL_PARAM params[] = {
		OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, group, 0),
		OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY, point, sizeof(point)),
		OSSL_PARAM_construct_end(),
	};
	EVP_PKEY *pkey = NULL;
	EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(NULL, "EC", NULL);
	if(ctx == NULL || EVP_PKEY_fromdata_init(ctx) != 1
			|| EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_PUBLIC_KEY, params) != 1){
		pkey = NULL;
	}
	EVP_PKEY_CTX_free(ctx);
	if(pkey != NULL){
		EVP_PKEY_CTX *check = EVP_PKEY_CTX_new_from_pkey(NULL, pkey, NULL);
		if(check == NULL || EVP_PKEY_public_check(check) != 1){
			EVP_PKEY_free(pkey);
			pkey = NULL;
		}
		EVP_PKEY_CTX_free(check);
	}
	if(pkey == NULL) *reason = "not a point of P-256";
	return pkey;
}

static const struct key *find_in(const struct key *keys, size_t count, const char *kid)
{
	for(size_t i = 0; i < count; i++){
		if(strcmp(keys[i].kid, kid) == 0) return &keys[i];
	}
	return NULL;
}

/* The key `kid` names; none while the JWKS file is missing (its last good keys wait for it). */
static const struct key *find_key(const struct plugin *p, const char *kid)
{
	return p->jwks_file.present ? find_in(p->keys, p->key_count, kid) : NULL;
}

/* Re-read the JWKS (broker/tokens.py `parse_jwks`). Missing: no keys; unparsable: the last good
 * keys are kept (broker/watched.py). Unusable keys are skipped with a warning. */
static void load_jwks(struct plugin *p)
{
	if(!p->jwks_file.present){
		mosquitto_log_printf(MOSQ_LOG_WARNING, LOG_PREFIX "cannot read %s: no device can connect", p->jwks_file.path);
		return;
	}
	cJSON *doc = read_json(p->jwks_file.path);
	const cJSON *keys = member(doc, "keys");
	struct key *loaded = cJSON_IsArray(keys) ? calloc((size_t)cJSON_GetArraySize(keys) + 1, sizeof(struct key)) : NULL;
	if(loaded == NULL){
		mosquitto_log_printf(MOSQ_LOG_WARNING,
				LOG_PREFIX "ignoring %s (keeping its last good content): a JWKS must be an object with a \"keys\" list",
				p->jwks_file.path);
		cJSON_Delete(doc);
		return;
	}
	size_t count = 0;
	int index = 0;
	const cJSON *jwk;
	cJSON_ArrayForEach(jwk, keys){
		const cJSON *kid = member(jwk, "kid");
		const char *reason = NULL;
		if(kid == NULL || !cJSON_IsString(kid) || kid->valuestring[0] == '\0'){
			mosquitto_log_printf(MOSQ_LOG_WARNING, LOG_PREFIX "JWKS key #%d has no kid: skipped", index);
		}else if(find_in(loaded, count, kid->valuestring) != NULL){
			mosquitto_log_printf(MOSQ_LOG_WARNING, LOG_PREFIX "JWKS key '%s' appears twice: the later one is skipped",
					kid->valuestring);
		}else{
			EVP_PKEY *pkey = jwk_public_key(jwk, &reason);
			char *copy = pkey != NULL ? strdup(kid->valuestring) : NULL;
			if(copy == NULL){
				EVP_PKEY_free(pkey);
				mosquitto_log_printf(MOSQ_LOG_WARNING, LOG_PREFIX "JWKS key '%s' skipped: %s", kid->valuestring,
						reason != NULL ? reason : "out of memory");
			}else{
				loaded[count].kid = copy;
				loaded[count].pkey = pkey;
				count++;
			}
		}
		index++;
	}
	cJSON_Delete(doc);
	free_key_array(p->keys, p->key_count);
	p->keys = loaded;
	p->key_count = count;
	mosquitto_log_printf(MOSQ_LOG_INFO, LOG_PREFIX "%zu signing key(s) from %s", p->key_count, p->jwks_file.path);
}

/* --- the denylist: broker/denylist.py -------------------------------------------------------
 * load_denylist takes exactly the documents `parse_denylist` takes (but for the JSON differences above, and a
 * whole number written 1.0 or 1e3, which cJSON cannot tell from 1 or 1000), and denied_until answers as
 * `refuses`. Hand-written: the rules are this project's. A repeated member name counts once, its last
 * value, as in the Python dict json.loads makes: in either table, and inside an older_credentials entry. */

static void free_denylist(struct plugin *p)
{
	free(p->revoked);
	free(p->older);
	cJSON_Delete(p->denylist);
	p->revoked = NULL;
	p->older = NULL;
	p->revoked_count = 0;
	p->older_count = 0;
	p->denylist = NULL;
}

static int denied_order(const void *a, const void *b)
{
	const struct denied *x = a, *y = b;
	int by_name = strcmp(x->device_id, y->device_id);
	if(by_name != 0) return by_name;
	return (x->order > y->order) - (x->order < y->order);
}

static int denied_key(const void *key, const void *entry)
{
	return strcmp(key, ((const struct denied *)entry)->device_id);
}

/* The entry of `device_id` in a table, NULL when it has none (bsearch must not get the NULL of no table). */
static const struct denied *find_denied(const struct denied *table, size_t count, const char *device_id)
{
	return count > 0 ? bsearch(device_id, table, count, sizeof(*table), denied_key) : NULL;
}

/* The members of `object` (NULL: none) as a table sorted by name, the last of each name only; NULL when
 * out of memory. The caller reads each entry's `value` into its other fields. */
static struct denied *denied_table(const cJSON *object, size_t *count)
{
	size_t n = 0, kept = 0;
	const cJSON *item;
	cJSON_ArrayForEach(item, object) n++;
	struct denied *table = calloc(n + 1, sizeof(*table));
	if(table == NULL) return NULL;
	n = 0;
	cJSON_ArrayForEach(item, object){
		table[n].device_id = item->string != NULL ? item->string : "";
		table[n].order = n;
		table[n].value = item;
		n++;
	}
	qsort(table, n, sizeof(*table), denied_order);
	for(size_t i = 0; i < n; i++){
		if(i + 1 < n && strcmp(table[i].device_id, table[i + 1].device_id) == 0) continue; /* a later one counts */
		table[kept++] = table[i];
	}
	*count = kept;
	return table;
}

/* An older_credentials entry as `_older` takes it: an object of only generation (a whole number, at least
 * 0), until (a whole number) and certificates (an array of strings; absent: none). */
static bool read_older(struct denied *entry)
{
	const cJSON *item;
	if(!cJSON_IsObject(entry->value)) return false;
	cJSON_ArrayForEach(item, entry->value){
		if(item->string == NULL || (strcmp(item->string, "generation") != 0 && strcmp(item->string, "until") != 0
				&& strcmp(item->string, "certificates") != 0)){
			return false;
		}
	}
	const cJSON *generation = member(entry->value, "generation"), *until = member(entry->value, "until");
	const cJSON *certificates = member(entry->value, "certificates");
	if(!whole_number(generation) || generation->valuedouble < 0 || !whole_number(until)) return false;
	if(certificates != NULL && !string_list(certificates)) return false;
	entry->generation = generation->valuedouble;
	entry->until = truncated(until->valuedouble);
	entry->certificates = certificates;
	return true;
}

/* Whether an older_credentials entry holds this credential: a certificate by its serial, a token by a gen
 * below the entry's generation. */
static bool older_holds(const struct denied *older, const struct credential *c)
{
	const cJSON *serial;
	if(c->serial == NULL) return c->generation < older->generation;
	cJSON_ArrayForEach(serial, older->certificates){
		if(strcmp(serial->valuestring, c->serial) == 0) return true;
	}
	return false;
}

/* Until when the denylist refuses `c`: the later until of the entries that would (its device's in "devices";
 * its older_credentials when they hold it), 0 when none would. Each entry refuses while now is before its
 * until, so `now < denied_until(p, c)` is broker/denylist.py `refuses` at any now >= 0. */
static long long denied_until(const struct plugin *p, const struct credential *c)
{
	long long until = 0;
	bool listed = false;
	if(!p->denylist_file.present || c->device_id == NULL) return 0;
	const struct denied *revoked = find_denied(p->revoked, p->revoked_count, c->device_id);
	const struct denied *older = find_denied(p->older, p->older_count, c->device_id);
	if(revoked != NULL){
		until = revoked->until;
		listed = true;
	}
	if(older != NULL && older_holds(older, c) && (!listed || older->until > until)) until = older->until;
	return until;
}

/* Re-read the denylist (the format at the top of broker/denylist.py). Missing is the normal "nobody
 * revoked"; an invalid file is ignored with a warning, its last good content kept (broker/watched.py). */
static void load_denylist(struct plugin *p)
{
	if(!p->denylist_file.present) return;
	cJSON *doc = read_json(p->denylist_file.path);
	const cJSON *devices = member(doc, "devices"), *older = member(doc, "older_credentials");
	struct denied *revoked = NULL, *olders = NULL;
	size_t revoked_count = 0, older_count = 0;
	if(cJSON_IsObject(devices) && (older == NULL || cJSON_IsObject(older))){
		revoked = denied_table(devices, &revoked_count);
		olders = revoked != NULL ? denied_table(older, &older_count) : NULL;
	}
	bool ok = olders != NULL;
	for(size_t i = 0; ok && i < revoked_count; i++){
		ok = whole_number(revoked[i].value);
		if(ok) revoked[i].until = truncated(revoked[i].value->valuedouble);
	}
	for(size_t i = 0; ok && i < older_count; i++) ok = read_older(&olders[i]);
	if(!ok){
		mosquitto_log_printf(MOSQ_LOG_WARNING,
				LOG_PREFIX "ignoring %s (keeping its last good content): expected {\"devices\": {device id: until}, "
				"\"older_credentials\": {device id: {\"generation\": n, \"certificates\": [serial hex], \"until\": until}}}",
				p->denylist_file.path);
		free(revoked);
		free(olders);
		cJSON_Delete(doc);
		return;
	}
	free_denylist(p);
	p->denylist = doc;
	p->revoked = revoked;
	p->revoked_count = revoked_count;
	p->older = olders;
	p->older_count = older_count;
}

static struct credential credential_of(const struct session *s)
{
	return (struct credential){.device_id = s->device_id, .generation = s->generation, .serial = s->serial};
}

static void refresh_files(struct plugin *p)
{
	if(file_changed(&p->jwks_file)) load_jwks(p);
	if(file_changed(&p->denylist_file)){
		load_denylist(p);
		/* Every session's credential judged again: a file that now lists it ends it on the next tick. */
		for(size_t b = 0; b < BUCKETS; b++){
			for(struct session *s = p->buckets[b]; s != NULL; s = s->next){
				struct credential c = credential_of(s);
				s->denied_until = denied_until(p, &c);
			}
		}
	}
}

/* --- sessions ---------------------------------------------------------------------------- */

static size_t bucket_of(const struct mosquitto *client)
{
	return ((size_t)(uintptr_t)client >> 4) % BUCKETS;
}

/* FNV-1a, unseeded: a device id is the bridge's random choice, never a client's. */
static size_t device_bucket_of(const char *device_id)
{
	uint32_t h = 2166136261u;
	for(const char *c = device_id; *c; c++) h = (h ^ (unsigned char)*c) * 16777619u;
	return (h ^ (h >> 16)) % BUCKETS;
}

static struct session *session_find(struct plugin *p, const struct mosquitto *client)
{
	for(struct session *s = p->buckets[bucket_of(client)]; s != NULL; s = s->next){
		if(s->client == client) return s;
	}
	return NULL;
}

static void session_remove(struct plugin *p, const struct mosquitto *client)
{
	struct session **link = &p->buckets[bucket_of(client)];
	while(*link != NULL){
		struct session *s = *link;
		if(s->client == client){
			*link = s->next;
			struct session **by_device = &p->devices[device_bucket_of(s->device_id)];
			while(*by_device != NULL && *by_device != s) by_device = &(*by_device)->next_of_device;
			if(*by_device != NULL) *by_device = s->next_of_device;
			cJSON_Delete(s->acl);
			free(s->serial);
			free(s);
			p->sessions--;
			return;
		}
		link = &s->next;
	}
}

/* --- presence -----------------------------------------------------------------------------
 * broker/server.py `_announce_presence`: `online` on {prefix}/presence/{device id} once a device's CONNECT
 * is accepted, `offline` once its session ends; QoS 0, not retained, from the broker itself (no client may
 * publish there: broker/acl.py, bridge/mosquitto/conf.py), for the bridge (bridge/edges/presence.py) and
 * ops to read. Mosquitto 2.0.11 queues the message (mosquitto_broker_publish_copy) and hands it to the
 * subscribers at the top of its next loop, each delivery under the usual READ check. */

/* Whether a session other than `s` holds s's device: a CONNECT taking over the device's client id.
 * Mosquitto authenticates the new CONNECT (its `online` goes out) before it ends the old session
 * (src/handle_connect.c connect__on_authorised), so the old one's end must say nothing. */
static bool device_held_elsewhere(const struct plugin *p, const struct session *s)
{
	for(const struct session *o = p->devices[device_bucket_of(s->device_id)]; o != NULL; o = o->next_of_device){
		if(o != s && strcmp(o->device_id, s->device_id) == 0) return true;
	}
	return false;
}

static void announce_presence(struct plugin *p, const char *device_id, bool online)
{
	if(p->presence_topic == NULL) return; /* no plugin_opt_topic_prefix: presence is off */
	memcpy(p->presence_topic + p->presence_head, device_id, DEVICE_ID_LEN + 1);
	const char *payload = online ? "online" : "offline"; /* provwire/topics.py PRESENCE_ONLINE, PRESENCE_OFFLINE */
	int rc = mosquitto_broker_publish_copy(NULL, p->presence_topic, (int)strlen(payload), payload, 0, false, NULL);
	if(rc != MOSQ_ERR_SUCCESS){
		mosquitto_log_printf(MOSQ_LOG_WARNING, LOG_PREFIX "presence of %s (%s) not published: error %d", device_id,
				payload, rc);
	}
}

/* The session of `client`, if any, has ended: forgotten, and its device said offline unless a newer session
 * holds it. Only here: DISCONNECT (the tick's kick too: it ends in context__disconnect, which raises it) and a
 * reused context at CONNECT, so a session says offline once. */
static void session_end(struct plugin *p, const struct mosquitto *client)
{
	struct session *s = session_find(p, client);
	if(s == NULL) return;
	if(!device_held_elsewhere(p, s)) announce_presence(p, s->device_id, false);
	session_remove(p, client);
}

/* --- publish limit: token buckets keyed by client id --------------------------------------
 * Hand-written: Mosquitto 2.0 has no per-client publish rate (see the top of this file), and a
 * token bucket is a few lines of arithmetic; the table is a plain chained hash with a random seed. */

static size_t rate_key_len(const char *client_id)
{
	size_t len = strlen(client_id);
	return len > RATE_KEY_MAX ? RATE_KEY_MAX : len;
}

/* FNV-1a from a random basis, high bits folded in: client ids are chosen by clients, so which ids
 * share a chain must not be predictable. */
static size_t rate_bucket_of(const struct plugin *p, const char *key, size_t len)
{
	uint32_t h = p->rate_seed;
	for(size_t i = 0; i < len; i++) h = (h ^ (unsigned char)key[i]) * 16777619u;
	return (h ^ (h >> 16)) % RATE_BUCKETS;
}

static struct rate_entry **rate_link(struct plugin *p, const char *key, size_t len)
{
	struct rate_entry **link = &p->rate_buckets[rate_bucket_of(p, key, len)];
	while(*link != NULL && !(strlen((*link)->client_id) == len && memcmp((*link)->client_id, key, len) == 0)){
		link = &(*link)->next;
	}
	return link;
}

static void rate_refill(const struct plugin *p, struct rate_entry *e, double now)
{
	if(now > e->last){
		e->tokens = fmin(p->publish_burst, e->tokens + (now - e->last) * p->publish_rate);
		e->last = now;
	}
}

static void rate_unlink(struct plugin *p, struct rate_entry **link)
{
	struct rate_entry *e = *link;
	*link = e->next;
	free(e);
	p->rate_count--;
}

/* Whether this client may publish once more now; takes the token when it may. */
static bool rate_take(struct plugin *p, const char *client_id)
{
	double now = monotonic_seconds();
	size_t len = rate_key_len(client_id);
	struct rate_entry **link = rate_link(p, client_id, len);
	struct rate_entry *e = *link;
	if(e == NULL){
		if(p->rate_count >= RATE_MAX_CLIENTS){
			if(p->rate_full_logged == 0 || now - p->rate_full_logged >= 10){
				p->rate_full_logged = now;
				mosquitto_log_printf(MOSQ_LOG_WARNING,
						LOG_PREFIX "%d client ids publishing at once: new ones are not publish-limited", RATE_MAX_CLIENTS);
			}
			return true;
		}
		e = calloc(1, sizeof(*e) + len + 1);
		if(e == NULL) return true;
		memcpy(e->client_id, client_id, len);
		e->tokens = p->publish_burst;
		e->last = now;
		*link = e;
		p->rate_count++;
	}
	rate_refill(p, e, now);
	if(e->tokens >= 1.0){
		e->tokens -= 1.0;
		return true;
	}
	if(!e->logged){
		e->logged = true;
		mosquitto_log_printf(MOSQ_LOG_NOTICE, LOG_PREFIX "client '%s' beyond %g publishes/s (burst %g): refusing them",
				e->client_id, p->publish_rate, p->publish_burst);
	}
	return false;
}

/* Forget `client_id`'s bucket if it has refilled (NULL: every full bucket). A full bucket is the
 * same as none, so forgetting it loses nothing, and a client in debt keeps it across reconnects. */
static void rate_forget_full(struct plugin *p, const char *client_id)
{
	if(p->rate_count == 0) return;
	double now = monotonic_seconds();
	if(client_id != NULL){
		size_t len = rate_key_len(client_id);
		struct rate_entry **link = rate_link(p, client_id, len);
		if(*link == NULL) return;
		rate_refill(p, *link, now);
		if((*link)->tokens >= p->publish_burst) rate_unlink(p, link);
		return;
	}
	for(size_t b = 0; b < RATE_BUCKETS; b++){
		struct rate_entry **link = &p->rate_buckets[b];
		while(*link != NULL){
			rate_refill(p, *link, now);
			if((*link)->tokens >= p->publish_burst) rate_unlink(p, link);
			else link = &(*link)->next;
		}
	}
}

/* --- token verification ------------------------------------------------------------------
 * The JWS split and the claim checks are hand-written against PyJWT 2.x, step for step and reason
 * for reason (the reasons are broker/tokens.py's). A C JWT library (libjwt) decides differently
 * on base64, `crit`, claim types and times, and would need the same checks around it. The
 * signature itself is OpenSSL's. */

static bool es256_verify(EVP_PKEY *pkey, const char *input, size_t input_len, const unsigned char *raw_sig)
{
	/* JWS carries r || s (32 bytes each); OpenSSL wants DER. */
	bool ok = false;
	unsigned char *der = NULL;
	ECDSA_SIG *sig = ECDSA_SIG_new();
	BIGNUM *r = BN_bin2bn(raw_sig, 32, NULL), *s = BN_bin2bn(raw_sig + 32, 32, NULL);
	if(sig == NULL || r == NULL || s == NULL || ECDSA_SIG_set0(sig, r, s) != 1){
		BN_free(r);
		BN_free(s);
		ECDSA_SIG_free(sig);
		return false;
	}
	int der_len = i2d_ECDSA_SIG(sig, &der);
	EVP_MD_CTX *md = EVP_MD_CTX_new();
	if(der_len > 0 && md != NULL && EVP_DigestVerifyInit(md, NULL, EVP_sha256(), NULL, pkey) == 1){
		ok = EVP_DigestVerify(md, der, (size_t)der_len, (const unsigned char *)input, input_len) == 1;
	}
	EVP_MD_CTX_free(md);
	OPENSSL_free(der);
	ECDSA_SIG_free(sig);
	return ok;
}

/* A time claim as PyJWT reads it, int(value): a finite JSON number truncated, true 1, false 0.
 * Strings are refused (a NumericDate is a JSON number, RFC 7519 §2; Python's int() would read
 * "123"): the one place this is stricter than PyJWT, for tokens only the issuer could sign. */
static bool int_claim(const cJSON *value, long long *out)
{
	if(cJSON_IsBool(value)){
		*out = cJSON_IsTrue(value) ? 1 : 0;
		return true;
	}
	if(!cJSON_IsNumber(value) || !isfinite(value->valuedouble)) return false;
	*out = truncated(value->valuedouble);
	return true;
}

static bool truthy(const cJSON *v)
{
	if(cJSON_IsString(v)) return v->valuestring[0] != '\0';
	if(cJSON_IsArray(v) || cJSON_IsObject(v)) return v->child != NULL;
	if(cJSON_IsNumber(v)) return v->valuedouble != 0;
	return cJSON_IsTrue(v);
}

static bool filters_ok(const cJSON *acl, const char *key)
{
	const cJSON *list = member(acl, key);
	if(list == NULL) return true; /* absent: an empty list */
	if(!cJSON_IsArray(list)) return false;
	const cJSON *item;
	cJSON_ArrayForEach(item, list){
		if(!cJSON_IsString(item) || !is_valid_filter(item->valuestring)) return false;
	}
	return true;
}

/* The claims checks of PyJWT `_validate_claims` (in its order) and broker/acl.py `device_grant`. */
static const char *check_claims(const struct plugin *p, const cJSON *claims, const char *device_id, double now)
{
	static const char *required[] = {"exp", "iss", "aud", "sub"};
	for(size_t i = 0; i < sizeof(required) / sizeof(required[0]); i++){
		const cJSON *value = member(claims, required[i]);
		if(value == NULL || cJSON_IsNull(value)) return "token lacks a required claim";
	}
	long long t;
	const cJSON *iat = member(claims, "iat"), *nbf = member(claims, "nbf"), *exp = member(claims, "exp");
	if(iat != NULL){
		if(!int_claim(iat, &t)) return "token invalid";
		if((double)t > now) return "token not valid yet";
	}
	if(nbf != NULL){
		if(!int_claim(nbf, &t)) return "token invalid";
		if((double)t > now) return "token not valid yet";
	}
	if(!int_claim(exp, &t)) return "token invalid";
	if((double)t <= now) return "token expired";
	if(!string_is(member(claims, "iss"), p->issuer)) return "token issuer mismatch";
	const cJSON *aud = member(claims, "aud");
	if(!truthy(aud)) return "token lacks a required claim";
	bool aud_ok = string_is(aud, p->audience);
	if(cJSON_IsArray(aud)){
		const cJSON *item;
		cJSON_ArrayForEach(item, aud){
			if(!cJSON_IsString(item)) return "token audience mismatch";
			if(strcmp(item->valuestring, p->audience) == 0) aud_ok = true;
		}
	}
	if(!aud_ok) return "token audience mismatch";
	if(!string_is(member(claims, "sub"), device_id)) return "token subject is not the username";
	const cJSON *jti = member(claims, "jti");
	if(jti != NULL && !cJSON_IsString(jti)) return "token invalid";
	/* broker/acl.py device_grant */
	if(!cJSON_IsObject(member(claims, "acl"))) return "token has no acl object";
	if(!cJSON_IsNumber(exp) || !isfinite(exp->valuedouble)) return "token exp is not a number";
	const cJSON *gen = member(claims, "gen"); /* the credential generation the denylist compares */
	if(gen != NULL && !(whole_number(gen) && gen->valuedouble >= 0)) return "token gen must be a whole number, at least 0";
	if(!filters_ok(member(claims, "acl"), "sub")) return "token acl.sub must be a list of topic filters";
	if(!filters_ok(member(claims, "acl"), "pub")) return "token acl.pub must be a list of topic filters";
	return NULL;
}

/* PyJWS `_validate_crit`: a non-empty list of extensions PyJWT supports (only b64), each present. */
static bool crit_ok(const cJSON *header, const cJSON *crit)
{
	if(!cJSON_IsArray(crit) || crit->child == NULL) return false;
	const cJSON *ext;
	cJSON_ArrayForEach(ext, crit){
		if(!string_is(ext, "b64") || member(header, "b64") == NULL) return false;
	}
	return true;
}

/* Verify `token` for `device_id` as broker/tokens.py `verify_device_token` does (PyJWT 2.x).
 * On success returns NULL and sets *claims_out (the caller frees it); else the refusal reason. */
static const char *verify_token(const struct plugin *p, const char *token, const char *device_id, double now,
		cJSON **claims_out)
{
	if(token == NULL || token[0] == '\0') return "device password (token) missing";
	size_t len = strlen(token);
	if(len > MAX_TOKEN_BYTES) return NOT_A_JWT; /* deliberately bounded: a token is a few hundred bytes */
	/* PyJWS `_load`: the signature after the last dot, the header before the first, the payload
	 * between; all three must be base64url and the header a JSON object, before anything else. */
	const char *dot1 = strchr(token, '.'), *dot2 = strrchr(token, '.');
	if(dot1 == NULL || dot2 == dot1) return NOT_A_JWT;
	const char *payload_seg = dot1 + 1, *sig_seg = dot2 + 1;
	size_t payload_len = (size_t)(dot2 - payload_seg);

	const char *reason = NULL;
	unsigned char *header_raw = NULL, *payload_raw = NULL, *sig = NULL;
	size_t header_n = 0, payload_n = 0, sig_n = 0;
	cJSON *header = NULL, *claims = NULL;
	const cJSON *kid = NULL, *crit = NULL;
	const struct key *key = NULL;
	bool detached = false;

	header_raw = b64url_decode(token, (size_t)(dot1 - token), &header_n);
	header = header_raw != NULL ? json_object_of(header_raw, header_n) : NULL;
	if(header == NULL){
		reason = NOT_A_JWT;
		goto done;
	}
	/* b64: false (RFC 7797) means a detached payload: the segment must be empty, and PyJWT then
	 * refuses the token for want of the payload (below, after the kid). */
	detached = cJSON_IsFalse(member(header, "b64"));
	if(detached){
		if(payload_len != 0) reason = NOT_A_JWT;
	}else{
		payload_raw = b64url_decode(payload_seg, payload_len, &payload_n);
		if(payload_raw == NULL) reason = NOT_A_JWT;
	}
	if(reason == NULL){
		sig = b64url_decode(sig_seg, strlen(sig_seg), &sig_n);
		if(sig == NULL) reason = NOT_A_JWT;
	}
	if(reason != NULL) goto done;
	/* PyJWS `_validate_headers` */
	kid = member(header, "kid");
	crit = member(header, "crit");
	if((kid != NULL && !cJSON_IsString(kid)) || (crit != NULL && !crit_ok(header, crit))){
		reason = NOT_A_JWT;
		goto done;
	}
	/* The algorithm is this code's, never the token's: anything but ES256 is refused. */
	if(!string_is(member(header, "alg"), "ES256")){
		reason = "token algorithm must be ES256";
		goto done;
	}
	if(kid == NULL || (key = find_key(p, kid->valuestring)) == NULL){
		reason = "token kid names no key of the JWKS";
		goto done;
	}
	if(detached){
		reason = "token invalid";
		goto done;
	}
	if(sig_n != 64 || !es256_verify(key->pkey, token, (size_t)(dot2 - token), sig)){
		reason = "token signature invalid";
		goto done;
	}
	claims = json_object_of(payload_raw, payload_n);
	if(claims == NULL){
		reason = "token invalid";
		goto done;
	}
	reason = check_claims(p, claims, device_id, now);
	if(reason == NULL){
		*claims_out = claims;
		claims = NULL;
	}
done:
	cJSON_Delete(claims);
	cJSON_Delete(header);
	free(sig);
	free(payload_raw);
	free(header_raw);
	return reason;
}

/* The credential generation of verified claims: their gen, 0 when absent (broker/acl.py `device_grant`). */
static double token_generation(const cJSON *claims)
{
	const cJSON *gen = member(claims, "gen");
	return gen != NULL ? gen->valuedouble : 0;
}

/* The CONNECT decision for a device (broker/auth.py `Authenticator._device`): NULL when accepted,
 * with the verified claims in *claims_out (the caller frees them) and the denylist's until for this
 * token in *until_out; else the reason it is refused. */
static const char *authenticate_device(struct plugin *p, const char *device_id, const char *client_id,
		const char *password, double now, cJSON **claims_out, long long *until_out)
{
	cJSON *claims = NULL;
	const char *reason;
	if(client_id == NULL || strcmp(client_id, device_id) != 0) return "client id must equal the device id";
	reason = verify_token(p, password, device_id, now, &claims);
	if(reason != NULL) return reason;
	struct credential token = {.device_id = device_id, .generation = token_generation(claims)};
	long long until = denied_until(p, &token);
	if(now < (double)until){
		cJSON_Delete(claims);
		return "device is revoked";
	}
	*claims_out = claims;
	*until_out = until;
	return NULL;
}

/* --- device certificates ------------------------------------------------------------------
 * broker/certificates.py step for step, reason for reason (tests/test_jwt_plugin_differential.py compares
 * the scope parsing). OpenSSL unwraps the DER; the JSON goes through the same gate and cJSON as tokens. */

/* Whether an object in `json`, at any depth, has a member twice: Python (object_pairs_hook) refuses them
 * wherever they are, and cJSON would keep the first copy where Python keeps the last. */
static bool has_duplicate_member(const cJSON *json)
{
	const cJSON *item, *other;
	cJSON_ArrayForEach(item, json){
		if(cJSON_IsObject(json) && item->string != NULL){
			for(other = item->next; other != NULL; other = other->next){
				if(other->string != NULL && strcmp(item->string, other->string) == 0) return true;
			}
		}
		if((cJSON_IsObject(item) || cJSON_IsArray(item)) && has_duplicate_member(item)) return true;
	}
	return false;
}

/* The scope in the extension's value `der` (the content of its OCTET STRING): NULL with the scope,
 * {"pub": [...], "sub": [...]} of valid filters, in *scope_out (the caller frees it); else the reason. */
static const char *scope_of_value(const unsigned char *der, size_t der_len, cJSON **scope_out)
{
	const char *reason = NULL;
	const unsigned char *cursor = der;
	unsigned char *again = NULL;
	char *text = NULL;
	cJSON *json = NULL;
	/* No bound of its own: the value is inside a certificate the device CA signed, already in memory. */
	ASN1_UTF8STRING *value = der_len <= LONG_MAX ? d2i_ASN1_UTF8STRING(NULL, &cursor, (long)der_len) : NULL;
	/* DER exactly: d2i reads BER lengths too, so the bytes must be what encoding the value gives back. */
	int again_len = value != NULL ? i2d_ASN1_UTF8STRING(value, &again) : -1;
	if(value == NULL || cursor != der + der_len || again_len < 0 || (size_t)again_len != der_len
			|| memcmp(again, der, der_len) != 0){
		reason = NOT_UTF8STRING;
		goto done;
	}
	size_t n = (size_t)ASN1_STRING_length(value);
	const unsigned char *bytes = ASN1_STRING_get0_data(value);
	for(size_t i = 0; i < n;){ /* strict UTF-8, as Python decodes it first */
		size_t len = utf8_sequence(bytes + i, n - i);
		if(len == 0){
			reason = NOT_UTF8STRING;
			goto done;
		}
		i += len;
	}
	text = malloc(n + 1);
	if(text == NULL){
		reason = "out of memory";
		goto done;
	}
	memcpy(text, bytes, n);
	text[n] = '\0';
	/* A leading byte order mark: cJSON skips it, and so does Python's json.loads for the token's bytes, but the
	 * scope is decoded to text first (broker/certificates.py), and json.loads refuses a BOM in text. */
	json = n >= 3 && memcmp(text, "\xEF\xBB\xBF", 3) == 0 ? NULL : parse_json(text, n);
	if(json == NULL) reason = "scope extension is not JSON";
	else if(has_duplicate_member(json)) reason = "scope extension has a member twice";
	else if(!cJSON_IsObject(json) || cJSON_GetArraySize(json) != 2 || !string_list(member(json, "pub"))
			|| !string_list(member(json, "sub"))){
		reason = "scope extension is not {\"pub\": [strings], \"sub\": [strings]}";
	}else if(!filters_ok(json, "pub") || !filters_ok(json, "sub")){
		reason = "scope extension holds a string that is not a topic filter";
	}
	if(reason == NULL){
		*scope_out = json;
		json = NULL;
	}
done:
	cJSON_Delete(json);
	free(text);
	OPENSSL_free(again);
	ASN1_UTF8STRING_free(value);
	return reason;
}

/* The scope extension of `cert`, read as scope_of_value does; it must be there exactly once. */
static const char *certificate_scope(X509 *cert, cJSON **scope_out)
{
	ASN1_OBJECT *oid = OBJ_txt2obj(SCOPE_OID, 1);
	if(oid == NULL) return "out of memory";
	int at = X509_get_ext_by_OBJ(cert, oid, -1);
	int twice = at >= 0 ? X509_get_ext_by_OBJ(cert, oid, at) : -1;
	ASN1_OBJECT_free(oid);
	if(at < 0) return "certificate has no scope extension";
	if(twice >= 0) return "certificate has the scope extension twice";
	const ASN1_OCTET_STRING *value = X509_EXTENSION_get_data(X509_get_ext(cert, at));
	if(value == NULL || ASN1_STRING_length(value) < 0) return NOT_UTF8STRING;
	return scope_of_value(ASN1_STRING_get0_data(value), (size_t)ASN1_STRING_length(value), scope_out);
}

/* The subject's one CN into `out`, when it is a device id (which also rules out an embedded NUL). */
static bool certificate_device_id(X509 *cert, char out[DEVICE_ID_LEN + 1])
{
	const X509_NAME *name = X509_get_subject_name(cert);
	int at = name != NULL ? X509_NAME_get_index_by_NID(name, NID_commonName, -1) : -1;
	if(at < 0 || X509_NAME_get_index_by_NID(name, NID_commonName, at) >= 0) return false;
	const ASN1_STRING *cn = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, at));
	if(cn == NULL || ASN1_STRING_length(cn) != DEVICE_ID_LEN) return false;
	memcpy(out, ASN1_STRING_get0_data(cn), DEVICE_ID_LEN);
	out[DEVICE_ID_LEN] = '\0';
	if(is_device_id(out)) return true;
	out[0] = '\0'; /* not a device id: never logged */
	return false;
}

/* The serial number as broker/certificates.py gives it, format(n, "x"): lowercase hex without leading
 * zeros ("0" for zero, "-" before a negative one). A malloc'd string, NULL when out of memory. BN_bn2hex
 * writes whole bytes in upper case ("0A"). */
static char *certificate_serial(X509 *cert)
{
	BIGNUM *bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(cert), NULL);
	char *hex = bn != NULL ? BN_bn2hex(bn) : NULL;
	BN_free(bn);
	if(hex == NULL) return NULL;
	bool negative = hex[0] == '-';
	const char *digits = hex + (negative ? 1 : 0);
	while(digits[0] == '0' && digits[1] != '\0') digits++;
	size_t len = strlen(digits);
	char *serial = malloc(len + 2);
	if(serial != NULL){
		char *out = serial;
		if(negative) *out++ = '-';
		for(size_t i = 0; i <= len; i++) out[i] = (char)tolower((unsigned char)digits[i]);
	}
	OPENSSL_free(hex);
	return serial;
}

static bool certificate_not_after(X509 *cert, long long *out)
{
	struct tm tm;
	const ASN1_TIME *not_after = X509_get0_notAfter(cert);
	if(not_after == NULL || ASN1_TIME_to_tm(not_after, &tm) != 1) return false;
	*out = (long long)timegm(&tm);
	return true;
}

/* The CONNECT decision for a client certificate (broker/certificates.py `certificate_device`, then the
 * denylist as broker/auth.py `authenticate_certificate`): NULL when accepted, with the device id in
 * `device_id`, the scope in *scope_out and the serial number in *serial_out (the caller frees both),
 * notAfter in *exp_out and the denylist's until for this certificate in *until_out; else the reason it
 * is refused. */
static const char *authenticate_certificate(struct plugin *p, X509 *cert, const char *username,
		const char *client_id, double now, char device_id[DEVICE_ID_LEN + 1], cJSON **scope_out,
		char **serial_out, long long *exp_out, long long *until_out)
{
	cJSON *scope = NULL;
	long long not_after = 0;
	if(!certificate_device_id(cert, device_id)) return BAD_CN;
	if(username == NULL || strcmp(username, device_id) != 0) return "username must equal the certificate's CN (the device id)";
	if(client_id == NULL || strcmp(client_id, device_id) != 0) return "client id must equal the device id";
	const char *reason = certificate_scope(cert, &scope);
	if(reason != NULL) return reason;
	if(!certificate_not_after(cert, &not_after) || now >= (double)not_after){
		cJSON_Delete(scope);
		return "certificate expired";
	}
	char *serial = certificate_serial(cert);
	if(serial == NULL){
		cJSON_Delete(scope);
		return "out of memory";
	}
	struct credential certificate = {.device_id = device_id, .serial = serial};
	long long until = denied_until(p, &certificate);
	if(now < (double)until){
		free(serial);
		cJSON_Delete(scope);
		return "device is revoked";
	}
	*scope_out = scope;
	*serial_out = serial;
	*exp_out = not_after;
	*until_out = until;
	return NULL;
}

/* The ACL decision for an authenticated device session (broker/acl.py `Grant.permits` and the
 * denylist): `topic` is a filter for SUBSCRIBE, else a topic name. */
static bool acl_allows(const struct session *s, int access, const char *topic, long long now)
{
	const cJSON *item;
	if(access == MOSQ_ACL_UNSUBSCRIBE) return true; /* harms no one */
	if(now >= s->exp || now < s->denied_until || topic == NULL) return false;
	switch(access){
		case MOSQ_ACL_WRITE:
			cJSON_ArrayForEach(item, member(s->acl, "pub")){
				if(topic_matches(item->valuestring, topic)) return true;
			}
			return false;
		case MOSQ_ACL_READ:
			cJSON_ArrayForEach(item, member(s->acl, "sub")){
				if(topic_matches(item->valuestring, topic)) return true;
			}
			return false;
		case MOSQ_ACL_SUBSCRIBE:
			cJSON_ArrayForEach(item, member(s->acl, "sub")){
				if(filter_covers(item->valuestring, topic)) return true;
			}
			return false;
		default:
			return false;
	}
}

/* --- callbacks --------------------------------------------------------------------------- */

/* A new session for `client` holding credential `c` (its device id a device id; a copy of its serial is
 * kept); NULL when out of memory: then nothing is kept and `acl` is not taken. */
static struct session *session_add(struct plugin *p, const struct mosquitto *client, const struct credential *c,
		long long exp, long long until, cJSON *acl)
{
	struct session *s = calloc(1, sizeof(*s));
	char *serial = c->serial != NULL ? strdup(c->serial) : NULL;
	if(s == NULL || (c->serial != NULL && serial == NULL)){
		free(s);
		free(serial);
		return NULL;
	}
	s->client = client;
	memcpy(s->device_id, c->device_id, DEVICE_ID_LEN + 1);
	s->exp = exp;
	s->denied_until = until;
	s->certificate = serial != NULL;
	s->generation = c->generation;
	s->serial = serial;
	s->acl = acl;
	size_t b = bucket_of(client);
	s->next = p->buckets[b];
	p->buckets[b] = s;
	b = device_bucket_of(s->device_id);
	s->next_of_device = p->devices[b];
	p->devices[b] = s;
	p->sessions++;
	return s;
}

/* A device's CONNECT with a token (username `device_id`, a device id), decided: NULL with the session added
 * for `client` in *session_out; else the reason it is refused. */
static const char *token_session(struct plugin *p, const struct mosquitto *client, const char *device_id,
		const char *client_id, const char *password, double now, struct session **session_out)
{
	cJSON *claims = NULL;
	long long until = 0, exp = 0;
	const char *reason = authenticate_device(p, device_id, client_id, password, now, &claims, &until);
	if(reason != NULL) return reason;
	struct credential token = {.device_id = device_id, .generation = token_generation(claims)};
	int_claim(member(claims, "exp"), &exp);
	cJSON *acl = cJSON_DetachItemViaPointer(claims, (cJSON *)member(claims, "acl"));
	cJSON_Delete(claims);
	*session_out = session_add(p, client, &token, exp, until, acl);
	if(*session_out != NULL) return NULL;
	cJSON_Delete(acl);
	return "out of memory";
}

/* A CONNECT over a client certificate, decided: NULL with the session added for `client` in *session_out;
 * else the reason it is refused. `device_id` gets the CN when it is a device id (else ""). */
static const char *certificate_session(struct plugin *p, const struct mosquitto *client, X509 *cert,
		const char *username, const char *client_id, double now, char device_id[DEVICE_ID_LEN + 1],
		struct session **session_out)
{
	cJSON *scope = NULL;
	char *serial = NULL;
	long long exp = 0, until = 0;
	const char *reason = authenticate_certificate(p, cert, username, client_id, now, device_id, &scope, &serial,
			&exp, &until);
	if(reason != NULL) return reason;
	struct credential certificate = {.device_id = device_id, .serial = serial};
	*session_out = session_add(p, client, &certificate, exp, until, scope);
	free(serial);
	if(*session_out != NULL) return NULL;
	cJSON_Delete(scope);
	return "out of memory";
}

/* A CONNECT over a client certificate: decided here, success or refusal, never deferred. */
static int certificate_basic_auth(struct plugin *p, const struct mosquitto_evt_basic_auth *ed, X509 *cert)
{
	char device_id[DEVICE_ID_LEN + 1] = "";
	struct session *s = NULL;
	refresh_files(p);
	const char *reason = certificate_session(p, ed->client, cert, ed->username, mosquitto_client_id(ed->client),
			now_seconds(), device_id, &s);
	if(reason != NULL){
		/* The CN may not be a device id: say whose certificate only when it is one. */
		mosquitto_log_printf(MOSQ_LOG_NOTICE, LOG_PREFIX "refused certificate of %s: %s",
				device_id[0] != '\0' ? device_id : "a client", reason);
		return MOSQ_ERR_AUTH;
	}
	mosquitto_log_printf(MOSQ_LOG_DEBUG, LOG_PREFIX "accepted certificate %s of %s until %lld", s->serial,
			s->device_id, s->exp);
	announce_presence(p, s->device_id, true);
	return MOSQ_ERR_SUCCESS;
}

static int on_basic_auth(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_basic_auth *ed = event_data;
	struct plugin *p = userdata;
	(void)event;

	session_end(p, ed->client); /* a reused context never inherits an earlier grant */
	/* Only the device-certificate listener asks for one (require_certificate): there every client is a
	 * device by its certificate, whatever username it gives, so an anonymous or other CONNECT never falls
	 * through to dynamic security. */
	X509 *cert = mosquitto_client_certificate(ed->client);
	if(cert != NULL){
		int rc = certificate_basic_auth(p, ed, cert);
		X509_free(cert);
		return rc;
	}
	if(!is_device_id(ed->username)) return MOSQ_ERR_PLUGIN_DEFER;

	refresh_files(p);
	struct session *s = NULL;
	const char *reason = token_session(p, ed->client, ed->username, mosquitto_client_id(ed->client), ed->password,
			now_seconds(), &s);
	if(reason != NULL){
		mosquitto_log_printf(MOSQ_LOG_NOTICE, LOG_PREFIX "refused %s: %s", ed->username, reason);
		return MOSQ_ERR_AUTH;
	}
	mosquitto_log_printf(MOSQ_LOG_DEBUG, LOG_PREFIX "accepted %s (gen %g) until %lld", s->device_id, s->generation,
			s->exp);
	announce_presence(p, s->device_id, true);
	return MOSQ_ERR_SUCCESS;
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	struct plugin *p = userdata;
	(void)event;

	struct session *s = session_find(p, ed->client);
	if(ed->access == MOSQ_ACL_WRITE && p->publish_rate > 0 && s == NULL){
		/* Publishes of clients that are not devices: anyone may connect as a provisioning client.
		 * Devices hold a token the bridge issued (and can revoke); their traffic is theirs to size.
		 * Delivery (READ) and SUBSCRIBE checks never take a token. */
		const char *client_id = mosquitto_client_id(ed->client);
		const char *username = mosquitto_client_username(ed->client);
		bool is_bridge = username != NULL && strcmp(username, p->bridge_username) == 0;
		if(client_id != NULL && !is_bridge && !rate_take(p, client_id)) return MOSQ_ERR_ACL_DENIED;
	}
	if(s == NULL) return MOSQ_ERR_PLUGIN_DEFER; /* not a device this plugin let in */
	/* broker/plugin.py `topic_filtering`: other devices' connections are the bridge's and ops' business only, and
	 * only the broker says them, whatever a device's scope covers. */
	if(p->presence_topic != NULL && ed->topic != NULL && ed->access != MOSQ_ACL_UNSUBSCRIBE
			&& strncmp(ed->topic, p->presence_topic, p->presence_head) == 0){
		return MOSQ_ERR_ACL_DENIED;
	}
	return acl_allows(s, ed->access, ed->topic, (long long)time(NULL)) ? MOSQ_ERR_SUCCESS : MOSQ_ERR_ACL_DENIED;
}

static int on_disconnect(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_disconnect *ed = event_data;
	struct plugin *p = userdata;
	(void)event;
	session_end(p, ed->client); /* offline, once: a kicked session ends here too */
	const char *client_id = mosquitto_client_id(ed->client);
	if(client_id != NULL) rate_forget_full(p, client_id);
	return MOSQ_ERR_SUCCESS;
}

/* Once a second: notice changed files, and end the sessions whose token expired or whose device
 * was revoked. Kicking runs the DISCONNECT callback (Mosquitto 2.0.11: disconnect_client, do_disconnect,
 * context__disconnect), which edits the table and says the device offline: collect first, announce nothing
 * here. */
static int on_tick(int event, void *event_data, void *userdata)
{
	struct plugin *p = userdata;
	(void)event;
	(void)event_data;

	time_t now = time(NULL);
	if(now == p->last_sweep) return MOSQ_ERR_SUCCESS;
	p->last_sweep = now;
	rate_forget_full(p, NULL);
	refresh_files(p);
	if(p->sessions == 0) return MOSQ_ERR_SUCCESS;

	size_t count = 0, capacity = 0;
	char (*kick)[DEVICE_ID_LEN + 1] = NULL;
	for(size_t b = 0; b < BUCKETS; b++){
		for(struct session *s = p->buckets[b]; s != NULL; s = s->next){
			bool expired = (long long)now >= s->exp, revoked = (long long)now < s->denied_until;
			if(s->kicked || (!expired && !revoked)) continue;
			if(count == capacity){
				size_t more = capacity ? capacity * 2 : 16;
				void *grown = realloc(kick, more * sizeof(*kick));
				if(grown == NULL) break;
				kick = grown;
				capacity = more;
			}
			s->kicked = true; /* its ACL checks are denied meanwhile */
			memcpy(kick[count++], s->device_id, DEVICE_ID_LEN + 1);
			mosquitto_log_printf(MOSQ_LOG_NOTICE, LOG_PREFIX "disconnecting %s: %s", s->device_id,
					revoked ? "device is revoked" : s->certificate ? "certificate expired" : "token expired");
		}
	}
	for(size_t i = 0; i < count; i++) mosquitto_kick_client_by_username(kick[i], false);
	free(kick);
	return MOSQ_ERR_SUCCESS;
}

/* --- plugin entry points ----------------------------------------------------------------- */

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for(int i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

static void free_plugin(struct plugin *p)
{
	for(size_t b = 0; b < BUCKETS; b++){
		while(p->buckets[b] != NULL) session_remove(p, p->buckets[b]->client);
	}
	for(size_t b = 0; b < RATE_BUCKETS; b++){
		while(p->rate_buckets[b] != NULL) rate_unlink(p, &p->rate_buckets[b]);
	}
	free_key_array(p->keys, p->key_count);
	free_denylist(p);
	free(p->jwks_file.path);
	free(p->denylist_file.path);
	free(p->audience);
	free(p->issuer);
	free(p->bridge_username);
	free(p->topic_prefix);
	free(p->presence_topic);
	free(p);
}

/* The string option `key` names, or NULL when it is not one. */
static char **string_option(struct plugin *p, const char *key)
{
	if(!strcmp(key, "jwks_file")) return &p->jwks_file.path;
	if(!strcmp(key, "denylist_file")) return &p->denylist_file.path;
	if(!strcmp(key, "audience")) return &p->audience;
	if(!strcmp(key, "issuer")) return &p->issuer;
	if(!strcmp(key, "bridge_username")) return &p->bridge_username;
	if(!strcmp(key, "topic_prefix")) return &p->topic_prefix;
	return NULL;
}

#define PRESENCE_LEVEL "/presence/"
#define TOPIC_MAX 65535 /* MQTT's limit on a topic's length */

/* The presence topic from plugin_opt_topic_prefix, taken as broker/acl.py `check_prefix` takes a prefix:
 * plain levels, none empty, no wildcard, not a $-topic (and UTF-8, the presence topic within MQTT's limit).
 * The option is optional, for a mosquitto.conf written before presence: without it nothing is published
 * (bridge/mosquitto/conf.py always writes it now). MOSQ_ERR_SUCCESS, MOSQ_ERR_INVAL (logged) or
 * MOSQ_ERR_NOMEM. */
static int presence_setup(struct plugin *p)
{
	const char *prefix = p->topic_prefix;
	if(prefix == NULL){
		mosquitto_log_printf(MOSQ_LOG_INFO, LOG_PREFIX "no plugin_opt_topic_prefix: device presence is not published");
		return MOSQ_ERR_SUCCESS;
	}
	size_t len = strlen(prefix);
	size_t head = len + strlen(PRESENCE_LEVEL);
	if(len == 0 || head + DEVICE_ID_LEN > TOPIC_MAX || prefix[0] == '$' || prefix[0] == '/' || prefix[len - 1] == '/'
			|| strstr(prefix, "//") != NULL || strpbrk(prefix, "+#") != NULL
			|| mosquitto_validate_utf8(prefix, (int)len) != MOSQ_ERR_SUCCESS){
		mosquitto_log_printf(MOSQ_LOG_ERR,
				LOG_PREFIX "plugin_opt_topic_prefix must be a topic of plain levels, not a $-topic");
		return MOSQ_ERR_INVAL;
	}
	p->presence_topic = malloc(head + DEVICE_ID_LEN + 1);
	if(p->presence_topic == NULL) return MOSQ_ERR_NOMEM;
	memcpy(p->presence_topic, prefix, len);
	memcpy(p->presence_topic + len, PRESENCE_LEVEL, strlen(PRESENCE_LEVEL) + 1);
	p->presence_head = head;
	mosquitto_log_printf(MOSQ_LOG_INFO, LOG_PREFIX "device presence published on %s+", p->presence_topic);
	return MOSQ_ERR_SUCCESS;
}

/* The plugin's state from its options, NULL (logged) when they are unusable. */
static struct plugin *plugin_new(struct mosquitto_opt *options, int option_count, int *rc)
{
	struct plugin *p = calloc(1, sizeof(*p));
	*rc = MOSQ_ERR_NOMEM;
	if(p == NULL) return NULL;
	for(int i = 0; i < option_count; i++){
		char **slot = string_option(p, options[i].key);
		if(slot != NULL){
			char *copy = strdup(options[i].value);
			if(copy == NULL){
				free_plugin(p);
				return NULL;
			}
			free(*slot);
			*slot = copy;
		}else if(!strcmp(options[i].key, "publish_rate") || !strcmp(options[i].key, "publish_burst")){
			char *end = NULL;
			errno = 0;
			double value = strtod(options[i].value, &end);
			if(errno != 0 || end == options[i].value || *end != '\0' || !isfinite(value) || value < 0){
				mosquitto_log_printf(MOSQ_LOG_ERR, LOG_PREFIX "plugin_opt_%s must be a number >= 0", options[i].key);
				free_plugin(p);
				*rc = MOSQ_ERR_INVAL;
				return NULL;
			}
			if(!strcmp(options[i].key, "publish_rate")) p->publish_rate = value;
			else p->publish_burst = floor(value);
		}
	}
	*rc = MOSQ_ERR_INVAL;
	if(!p->jwks_file.path || !p->denylist_file.path || !p->audience || !p->issuer){
		mosquitto_log_printf(MOSQ_LOG_ERR,
				LOG_PREFIX "needs plugin_opt_jwks_file, plugin_opt_denylist_file, plugin_opt_audience, plugin_opt_issuer");
		free_plugin(p);
		return NULL;
	}
	if(getrandom(&p->rate_seed, sizeof(p->rate_seed), GRND_NONBLOCK) != (ssize_t)sizeof(p->rate_seed)){
		p->rate_seed = (uint32_t)(monotonic_seconds() * 1e9) ^ (uint32_t)(uintptr_t)p;
	}
	if(p->publish_burst < 1) p->publish_rate = 0; /* either one 0 or absent: no publish limit */
	if(p->publish_rate > 0 && p->bridge_username == NULL){
		mosquitto_log_printf(MOSQ_LOG_ERR, LOG_PREFIX "plugin_opt_publish_rate needs plugin_opt_bridge_username");
		free_plugin(p);
		return NULL;
	}
	if(p->publish_rate > 0){
		mosquitto_log_printf(MOSQ_LOG_INFO, LOG_PREFIX "publishes limited to %g/s, burst %g, per client id (not %s)",
				p->publish_rate, p->publish_burst, p->bridge_username);
	}
	*rc = presence_setup(p);
	if(*rc != MOSQ_ERR_SUCCESS){
		free_plugin(p);
		return NULL;
	}
	refresh_files(p);
	if(!p->jwks_file.present) load_jwks(p); /* says so in the log */
	*rc = MOSQ_ERR_SUCCESS;
	return p;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata, struct mosquitto_opt *options,
		int option_count)
{
	int rc;
	struct plugin *p = plugin_new(options, option_count, &rc);
	if(p == NULL) return rc;
	p->pid = identifier;
	if(mosquitto_callback_register(p->pid, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, p) != MOSQ_ERR_SUCCESS
			|| mosquitto_callback_register(p->pid, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, p) != MOSQ_ERR_SUCCESS
			|| mosquitto_callback_register(p->pid, MOSQ_EVT_DISCONNECT, on_disconnect, NULL, p) != MOSQ_ERR_SUCCESS
			|| mosquitto_callback_register(p->pid, MOSQ_EVT_TICK, on_tick, NULL, p) != MOSQ_ERR_SUCCESS){
		mosquitto_log_printf(MOSQ_LOG_ERR, LOG_PREFIX "cannot register callbacks");
		free_plugin(p);
		return MOSQ_ERR_UNKNOWN;
	}
	*userdata = p;
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	struct plugin *p = userdata;
	(void)options;
	(void)option_count;
	if(p == NULL) return MOSQ_ERR_SUCCESS;
	mosquitto_callback_unregister(p->pid, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
	mosquitto_callback_unregister(p->pid, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
	mosquitto_callback_unregister(p->pid, MOSQ_EVT_DISCONNECT, on_disconnect, NULL);
	mosquitto_callback_unregister(p->pid, MOSQ_EVT_TICK, on_tick, NULL);
	free_plugin(p);
	return MOSQ_ERR_SUCCESS;
}
