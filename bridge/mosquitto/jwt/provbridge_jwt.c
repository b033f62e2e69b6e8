/*
 * provbridge_jwt: a Mosquitto 2.0 plugin that verifies provbridge device tokens itself, as the
 * embedded broker does (broker/auth.py, broker/tokens.py, broker/acl.py), so the bridge need not
 * mirror each token into the dynamic-security plugin.
 *
 *   plugin /path/provbridge_jwt.so          before the dynamic-security plugin line
 *   plugin_opt_jwks_file /data/jwks.json    the keys that sign device tokens (re-read when changed)
 *   plugin_opt_denylist_file /data/denylist.json   revoked devices (re-read when changed)
 *   plugin_opt_audience provbridge-mqtt
 *   plugin_opt_issuer provbridge
 *   plugin_opt_bridge_username provbridge-bridge   the bridge's account: never publish-limited
 *   plugin_opt_publish_rate 10      publishes a second per client id (0 or absent: no limit)
 *   plugin_opt_publish_burst 20     the bucket's size
 *
 * CONNECT with a username shaped like a device id (dev_ + 26 base32 letters): this plugin decides,
 * success or refusal, never deferring. The password must be an ES256 JWT whose header `kid` names a
 * key of the JWKS; claims as PyJWT checks them (exp, iss, aud, sub required; iat/nbf not in the
 * future; jti a string), sub == username == client id, an `acl` object with `pub`/`sub` lists of
 * topic filters, and the device not in the denylist. Every other CONNECT is deferred to the next
 * plugin (dynamic security: the bridge, provisioning and ops accounts).
 *
 * ACL checks of sessions it authenticated: publish if the topic matches acl.pub, subscribe if the
 * filter is covered by an acl.sub filter, delivery if the topic matches acl.sub; everything denied
 * once exp has passed or the device is denied. Once a second (on the broker's tick) the files are
 * checked for changes and sessions whose token expired or whose device was revoked are kicked.
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
 * Tokens are never logged: only the device id and the reason.
 */

#include <errno.h>
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

/* --- state ------------------------------------------------------------------------------- */

struct watched {
	const char *path;
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

struct denied {
	char *device_id;
	long long until;
};

/* One authenticated device session, keyed by its Mosquitto context. */
struct session {
	const struct mosquitto *client;
	char device_id[DEVICE_ID_LEN + 1];
	long long exp;
	long long denied_until;
	bool kicked;
	cJSON *acl; /* the token's acl object: "pub" and "sub" arrays of valid filters */
	struct session *next;
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
	double publish_rate; /* tokens a second; 0: no publish limit */
	double publish_burst;
	uint32_t rate_seed;
	size_t rate_count;
	double rate_full_logged;
	struct rate_entry *rate_buckets[RATE_BUCKETS];
	struct watched jwks_file;
	struct watched denylist_file;
	struct key *keys;
	size_t key_count;
	struct denied *denied;
	size_t denied_count;
	time_t last_sweep;
	size_t sessions;
	struct session *buckets[BUCKETS];
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

static int b64url_value(char c)
{
	if(c >= 'A' && c <= 'Z') return c - 'A';
	if(c >= 'a' && c <= 'z') return c - 'a' + 26;
	if(c >= '0' && c <= '9') return c - '0' + 52;
	if(c == '-') return 62;
	if(c == '_') return 63;
	return -1;
}

/* Strict unpadded base64url. Returns a malloc'd, NUL-terminated buffer, or NULL. */
static unsigned char *b64url_decode(const char *in, size_t len, size_t *out_len)
{
	if(len % 4 == 1) return NULL;
	unsigned char *out = malloc(len * 3 / 4 + 2);
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
		acc = (acc << 6) | (unsigned int)v;
		bits += 6;
		if(bits >= 8){
			bits -= 8;
			out[n++] = (unsigned char)((acc >> bits) & 0xFF);
		}
	}
	out[n] = '\0';
	*out_len = n;
	return out;
}

/* JSON from base64url, as a JSON object; NULL if not. A NUL inside (raw or \u0000) is refused:
 * cJSON strings end at NUL, where Python's would go on. */
static cJSON *b64url_json_object(const char *in, size_t len)
{
	size_t n;
	unsigned char *raw = b64url_decode(in, len, &n);
	if(raw == NULL) return NULL;
	cJSON *json = NULL;
	if(memchr(raw, '\0', n) == NULL && strstr((char *)raw, "\\u0000") == NULL){
		json = cJSON_ParseWithLength((char *)raw, n);
	}
	free(raw);
	if(json != NULL && !cJSON_IsObject(json)){
		cJSON_Delete(json);
		return NULL;
	}
	return json;
}

static const cJSON *member(const cJSON *object, const char *name)
{
	return cJSON_GetObjectItemCaseSensitive(object, name);
}

/* Python's int(x) of a JSON number: truncation toward zero, clamped to avoid overflow. */
static long long truncated(double value)
{
	if(value >= 9e18) return 9000000000000000000LL;
	if(value <= -9e18) return -9000000000000000000LL;
	return (long long)value;
}

/* --- topics: provwire/topics.py and broker/acl.py ---------------------------------------- */

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
	if(!is_valid_filter(filter) || !is_valid_topic(topic)) return false;
	if(topic[0] == '$' && (filter[0] == '+' || filter[0] == '#')) return false;
	const char *f = filter, *t = topic;
	for(;;){
		size_t flen = level_len(f);
		if(level_is(f, flen, "#")) return true; /* also matches the parent level */
		if(t == NULL) return false;
		size_t tlen = level_len(t);
		if(!level_is(f, flen, "+") && (flen != tlen || memcmp(f, t, flen) != 0)) return false;
		const char *fnext = f[flen] == '/' ? f + flen + 1 : NULL;
		const char *tnext = t[tlen] == '/' ? t + tlen + 1 : NULL;
		if(fnext == NULL) return tnext == NULL;
		f = fnext;
		t = tnext;
	}
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
				json = cJSON_ParseWithLength(buf, (size_t)size);
			}
		}
	}
	free(buf);
	fclose(f);
	return json;
}

static void free_keys(struct plugin *p)
{
	for(size_t i = 0; i < p->key_count; i++){
		free(p->keys[i].kid);
		EVP_PKEY_free(p->keys[i].pkey);
	}
	free(p->keys);
	p->keys = NULL;
	p->key_count = 0;
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

static bool string_is(const cJSON *value, const char *expected)
{
	return cJSON_IsString(value) && strcmp(value->valuestring, expected) == 0;
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

static const struct key *find_key(const struct plugin *p, const char *kid)
{
	for(size_t i = 0; i < p->key_count; i++){
		if(strcmp(p->keys[i].kid, kid) == 0) return &p->keys[i];
	}
	return NULL;
}

/* Re-read the JWKS. Missing or unparsable: no keys (every token refused). */
static void load_jwks(struct plugin *p)
{
	free_keys(p);
	if(!p->jwks_file.present){
		mosquitto_log_printf(MOSQ_LOG_WARNING, LOG_PREFIX "cannot read %s: no device can connect", p->jwks_file.path);
		return;
	}
	cJSON *doc = read_json(p->jwks_file.path);
	const cJSON *keys = cJSON_IsObject(doc) ? member(doc, "keys") : NULL;
	if(!cJSON_IsArray(keys)){
		mosquitto_log_printf(MOSQ_LOG_WARNING, LOG_PREFIX "ignoring %s: a JWKS must be an object with a \"keys\" list",
				p->jwks_file.path);
		cJSON_Delete(doc);
		return;
	}
	p->keys = calloc((size_t)cJSON_GetArraySize(keys) + 1, sizeof(struct key));
	int index = 0;
	const cJSON *jwk;
	cJSON_ArrayForEach(jwk, keys){
		const cJSON *kid = cJSON_IsObject(jwk) ? member(jwk, "kid") : NULL;
		const char *reason = NULL;
		if(!cJSON_IsString(kid) || kid->valuestring[0] == '\0'){
			mosquitto_log_printf(MOSQ_LOG_WARNING, LOG_PREFIX "JWKS key #%d has no kid: skipped", index);
		}else if(find_key(p, kid->valuestring) != NULL){
			mosquitto_log_printf(MOSQ_LOG_WARNING, LOG_PREFIX "JWKS key '%s' appears twice: the later one is skipped",
					kid->valuestring);
		}else if(p->keys != NULL){
			EVP_PKEY *pkey = jwk_public_key(jwk, &reason);
			if(pkey == NULL){
				mosquitto_log_printf(MOSQ_LOG_WARNING, LOG_PREFIX "JWKS key '%s' skipped: %s", kid->valuestring, reason);
			}else{
				p->keys[p->key_count].kid = strdup(kid->valuestring);
				p->keys[p->key_count].pkey = pkey;
				p->key_count++;
			}
		}
		index++;
	}
	cJSON_Delete(doc);
	mosquitto_log_printf(MOSQ_LOG_INFO, LOG_PREFIX "%zu signing key(s) from %s", p->key_count, p->jwks_file.path);
}

static void free_denied(struct plugin *p)
{
	for(size_t i = 0; i < p->denied_count; i++) free(p->denied[i].device_id);
	free(p->denied);
	p->denied = NULL;
	p->denied_count = 0;
}

static long long denied_until(const struct plugin *p, const char *device_id)
{
	for(size_t i = 0; i < p->denied_count; i++){
		if(strcmp(p->denied[i].device_id, device_id) == 0) return p->denied[i].until;
	}
	return 0;
}

/* Re-read the denylist: {"devices": {device id: until}}. Missing is the normal "nobody revoked";
 * an invalid file is ignored with a warning (broker/denylist.py does the same). */
static void load_denylist(struct plugin *p)
{
	free_denied(p);
	if(!p->denylist_file.present) return;
	cJSON *doc = read_json(p->denylist_file.path);
	const cJSON *devices = cJSON_IsObject(doc) ? member(doc, "devices") : NULL;
	bool ok = cJSON_IsObject(devices);
	const cJSON *entry;
	if(ok){
		cJSON_ArrayForEach(entry, devices){
			if(!cJSON_IsNumber(entry) || entry->valuedouble != floor(entry->valuedouble)) ok = false;
		}
	}
	if(!ok){
		mosquitto_log_printf(MOSQ_LOG_WARNING, LOG_PREFIX "ignoring %s: expected {\"devices\": {device id: until}}",
				p->denylist_file.path);
		cJSON_Delete(doc);
		return;
	}
	p->denied = calloc((size_t)cJSON_GetArraySize(devices) + 1, sizeof(struct denied));
	if(p->denied != NULL){
		cJSON_ArrayForEach(entry, devices){
			p->denied[p->denied_count].device_id = strdup(entry->string);
			p->denied[p->denied_count].until = truncated(entry->valuedouble);
			p->denied_count++;
		}
	}
	cJSON_Delete(doc);
}

static void refresh_files(struct plugin *p)
{
	if(file_changed(&p->jwks_file)) load_jwks(p);
	if(file_changed(&p->denylist_file)){
		load_denylist(p);
		for(size_t b = 0; b < BUCKETS; b++){
			for(struct session *s = p->buckets[b]; s != NULL; s = s->next){
				s->denied_until = denied_until(p, s->device_id);
			}
		}
	}
}

/* --- sessions ---------------------------------------------------------------------------- */

static size_t bucket_of(const struct mosquitto *client)
{
	return ((size_t)(uintptr_t)client >> 4) % BUCKETS;
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
			cJSON_Delete(s->acl);
			free(s);
			p->sessions--;
			return;
		}
		link = &s->next;
	}
}

/* --- publish limit: token buckets keyed by client id -------------------------------------- */

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

/* --- token verification ------------------------------------------------------------------ */

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

/* A claim PyJWT converts with int(): here a JSON number (strings are refused). */
static bool int_claim(const cJSON *value, long long *out)
{
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

/* The claims checks of broker/tokens.py (PyJWT) and broker/acl.py `device_grant`. */
static const char *check_claims(const struct plugin *p, const cJSON *claims, const char *device_id, double now)
{
	static const char *required[] = {"exp", "iss", "aud", "sub"};
	for(size_t i = 0; i < sizeof(required) / sizeof(required[0]); i++){
		const cJSON *value = member(claims, required[i]);
		if(value == NULL || cJSON_IsNull(value)) return "token lacks a required claim";
	}
	long long t;
	const cJSON *iat = member(claims, "iat"), *nbf = member(claims, "nbf"), *exp = member(claims, "exp");
	if(iat != NULL && (!int_claim(iat, &t) || (double)t > now)) return "token not valid yet";
	if(nbf != NULL && (!int_claim(nbf, &t) || (double)t > now)) return "token not valid yet";
	if(!int_claim(exp, &t)) return "token exp is not a number";
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
	const cJSON *acl = member(claims, "acl");
	if(!cJSON_IsObject(acl)) return "token has no acl object";
	if(!filters_ok(acl, "pub")) return "token acl.pub must be a list of topic filters";
	if(!filters_ok(acl, "sub")) return "token acl.sub must be a list of topic filters";
	return NULL;
}

/* Verify `token` for `device_id`. On success returns NULL and sets *claims_out (caller frees). */
static const char *verify_token(const struct plugin *p, const char *token, const char *device_id, double now,
		cJSON **claims_out)
{
	if(token == NULL || token[0] == '\0') return "device password (token) missing";
	size_t len = strlen(token);
	if(len > MAX_TOKEN_BYTES) return "password is not a JWT";
	const char *dot1 = strchr(token, '.');
	const char *dot2 = dot1 ? strchr(dot1 + 1, '.') : NULL;
	if(dot1 == NULL || dot2 == NULL || strchr(dot2 + 1, '.') != NULL) return "password is not a JWT";

	cJSON *header = b64url_json_object(token, (size_t)(dot1 - token));
	if(header == NULL) return "password is not a JWT";
	/* The algorithm is this code's, never the token's: anything but ES256 is refused. */
	const char *reason = NULL;
	const cJSON *kid = member(header, "kid");
	const struct key *key = NULL;
	if(!string_is(member(header, "alg"), "ES256")){
		reason = "token algorithm must be ES256";
	}else if(member(header, "crit") != NULL || member(header, "b64") != NULL){
		reason = "token header has unsupported parameters";
	}else if(!cJSON_IsString(kid) || (key = find_key(p, kid->valuestring)) == NULL){
		reason = "token kid names no key of the JWKS";
	}
	cJSON_Delete(header);
	if(reason != NULL) return reason;

	size_t sig_len;
	unsigned char *sig = b64url_decode(dot2 + 1, strlen(dot2 + 1), &sig_len);
	bool signed_ok = sig != NULL && sig_len == 64 && es256_verify(key->pkey, token, (size_t)(dot2 - token), sig);
	free(sig);
	if(!signed_ok) return "token signature invalid";

	cJSON *claims = b64url_json_object(dot1 + 1, (size_t)(dot2 - dot1 - 1));
	if(claims == NULL) return "token invalid";
	reason = check_claims(p, claims, device_id, now);
	if(reason != NULL){
		cJSON_Delete(claims);
		return reason;
	}
	*claims_out = claims;
	return NULL;
}

/* --- callbacks --------------------------------------------------------------------------- */

static int on_basic_auth(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_basic_auth *ed = event_data;
	struct plugin *p = userdata;
	(void)event;

	session_remove(p, ed->client); /* a reused context never inherits an earlier grant */
	if(!is_device_id(ed->username)) return MOSQ_ERR_PLUGIN_DEFER;

	refresh_files(p);
	const char *device_id = ed->username;
	const char *client_id = mosquitto_client_id(ed->client);
	double now = now_seconds();
	cJSON *claims = NULL;
	const char *reason = NULL;
	if(client_id == NULL || strcmp(client_id, device_id) != 0){
		reason = "client id must equal the device id";
	}else{
		reason = verify_token(p, ed->password, device_id, now, &claims);
	}
	long long until = reason == NULL ? denied_until(p, device_id) : 0;
	if(reason == NULL && now < (double)until) reason = "device is revoked";
	struct session *s = reason == NULL ? calloc(1, sizeof(*s)) : NULL;
	if(reason == NULL && s == NULL) reason = "out of memory";
	if(reason != NULL){
		cJSON_Delete(claims);
		mosquitto_log_printf(MOSQ_LOG_NOTICE, LOG_PREFIX "refused %s: %s", device_id, reason);
		return MOSQ_ERR_AUTH;
	}
	s->client = ed->client;
	memcpy(s->device_id, device_id, DEVICE_ID_LEN + 1);
	long long exp = 0;
	int_claim(member(claims, "exp"), &exp);
	s->exp = exp;
	s->denied_until = until;
	s->acl = cJSON_DetachItemFromObjectCaseSensitive(claims, "acl");
	cJSON_Delete(claims);
	size_t b = bucket_of(ed->client);
	s->next = p->buckets[b];
	p->buckets[b] = s;
	p->sessions++;
	mosquitto_log_printf(MOSQ_LOG_DEBUG, LOG_PREFIX "accepted %s until %lld", device_id, exp);
	return MOSQ_ERR_SUCCESS;
}

static bool any_filter(const cJSON *acl, const char *key, const char *topic, bool subscribe)
{
	const cJSON *item;
	cJSON_ArrayForEach(item, member(acl, key)){
		if(subscribe ? filter_covers(item->valuestring, topic) : topic_matches(item->valuestring, topic)) return true;
	}
	return false;
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
	long long now = (long long)time(NULL);
	if(ed->access == MOSQ_ACL_UNSUBSCRIBE) return MOSQ_ERR_SUCCESS; /* harms no one */
	if(now >= s->exp || now < s->denied_until || ed->topic == NULL) return MOSQ_ERR_ACL_DENIED;
	bool allowed = false;
	switch(ed->access){
		case MOSQ_ACL_WRITE:
			allowed = any_filter(s->acl, "pub", ed->topic, false);
			break;
		case MOSQ_ACL_READ:
			allowed = any_filter(s->acl, "sub", ed->topic, false);
			break;
		case MOSQ_ACL_SUBSCRIBE:
			allowed = any_filter(s->acl, "sub", ed->topic, true);
			break;
		default:
			break;
	}
	return allowed ? MOSQ_ERR_SUCCESS : MOSQ_ERR_ACL_DENIED;
}

static int on_disconnect(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_disconnect *ed = event_data;
	struct plugin *p = userdata;
	(void)event;
	session_remove(p, ed->client);
	const char *client_id = mosquitto_client_id(ed->client);
	if(client_id != NULL) rate_forget_full(p, client_id);
	return MOSQ_ERR_SUCCESS;
}

/* Once a second: notice changed files, and end the sessions whose token expired or whose device
 * was revoked. Kicking runs the DISCONNECT callback, which edits the table: collect first. */
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
					revoked ? "device is revoked" : "token expired");
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
	free_keys(p);
	free_denied(p);
	free((char *)p->jwks_file.path);
	free((char *)p->denylist_file.path);
	free(p->audience);
	free(p->issuer);
	free(p->bridge_username);
	free(p);
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata, struct mosquitto_opt *options,
		int option_count)
{
	struct plugin *p = calloc(1, sizeof(*p));
	if(p == NULL) return MOSQ_ERR_NOMEM;
	p->pid = identifier;
	for(int i = 0; i < option_count; i++){
		char **slot = NULL;
		if(!strcmp(options[i].key, "jwks_file")) slot = (char **)&p->jwks_file.path;
		else if(!strcmp(options[i].key, "denylist_file")) slot = (char **)&p->denylist_file.path;
		else if(!strcmp(options[i].key, "audience")) slot = &p->audience;
		else if(!strcmp(options[i].key, "issuer")) slot = &p->issuer;
		else if(!strcmp(options[i].key, "bridge_username")) slot = &p->bridge_username;
		else if(!strcmp(options[i].key, "publish_rate") || !strcmp(options[i].key, "publish_burst")){
			char *end = NULL;
			errno = 0;
			double value = strtod(options[i].value, &end);
			if(errno != 0 || end == options[i].value || *end != '\0' || !isfinite(value) || value < 0){
				mosquitto_log_printf(MOSQ_LOG_ERR, LOG_PREFIX "plugin_opt_%s must be a number >= 0", options[i].key);
				free_plugin(p);
				return MOSQ_ERR_INVAL;
			}
			if(!strcmp(options[i].key, "publish_rate")) p->publish_rate = value;
			else p->publish_burst = floor(value);
		}
		if(slot != NULL){
			free(*slot);
			*slot = strdup(options[i].value);
		}
	}
	if(!p->jwks_file.path || !p->denylist_file.path || !p->audience || !p->issuer){
		mosquitto_log_printf(MOSQ_LOG_ERR,
				LOG_PREFIX "needs plugin_opt_jwks_file, plugin_opt_denylist_file, plugin_opt_audience, plugin_opt_issuer");
		free_plugin(p);
		return MOSQ_ERR_INVAL;
	}
	if(getrandom(&p->rate_seed, sizeof(p->rate_seed), GRND_NONBLOCK) != (ssize_t)sizeof(p->rate_seed)){
		p->rate_seed = (uint32_t)(monotonic_seconds() * 1e9) ^ (uint32_t)(uintptr_t)p;
	}
	if(p->publish_burst < 1) p->publish_rate = 0; /* either one 0 or absent: no publish limit */
	if(p->publish_rate > 0 && p->bridge_username == NULL){
		mosquitto_log_printf(MOSQ_LOG_ERR, LOG_PREFIX "plugin_opt_publish_rate needs plugin_opt_bridge_username");
		free_plugin(p);
		return MOSQ_ERR_INVAL;
	}
	if(p->publish_rate > 0){
		mosquitto_log_printf(MOSQ_LOG_INFO, LOG_PREFIX "publishes limited to %g/s, burst %g, per client id (not %s)",
				p->publish_rate, p->publish_burst, p->bridge_username);
	}
	refresh_files(p);
	if(!p->jwks_file.present) load_jwks(p); /* says so in the log */
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
