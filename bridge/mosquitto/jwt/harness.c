/*
 * harness.c: the provbridge_jwt plugin's decisions as a small program, for
 * tests/test_jwt_plugin_differential.py, which holds them against the embedded broker's (PyJWT,
 * broker/acl.py). It includes provbridge_jwt.c itself, so the very functions Mosquitto calls are
 * the ones tested, static ones included; `make -C bridge/mosquitto/jwt harness` builds it with
 * AddressSanitizer and UBSan (any report aborts it, and the test with it).
 *
 * A program rather than a shared library for ctypes: an ASan-instrumented library needs the ASan
 * runtime preloaded into the process that loads it, i.e. into pytest and all it imports.
 *
 * Protocol on stdin/stdout, one request then one answer, until end of input. A request is one
 * command byte, then its fields; an answer is one code byte, the number of its fields (4 bytes),
 * then its fields. A field or a number is a 4-byte little-endian length and that many bytes. The plugin gets each field as a C string (Mosquitto
 * hands it the password as one too): a field is cut at its first NUL byte.
 *
 *   P jwks_file denylist_file audience issuer   the plugin's options (a new plugin); answer '+'
 *   R force                       re-read the files that changed ("1": both, as if both changed);
 *                                 answer '+' and the usable kids, one field each
 *   C username client_id password now         a CONNECT at `now` (unix seconds, a decimal), the
 *                                 files re-read first if they changed, as on_basic_auth does:
 *                                 answer 'A' (accepted: fields exp, acl as JSON, the token's gen (%.17g),
 *                                 the denylist's until for it, the session's number), 'R' (refused:
 *                                 field reason) or 'D' (deferred: not a device id). An accepted session
 *                                 is kept, as Mosquitto's would be, until 'D' ends it.
 *   S acl_json exp denied_until access topic now   an ACL check of a device session whose token
 *                                 has this acl object; access "write", "read" or "subscribe":
 *                                 answer 'Y' or 'N', 'E' when acl_json is not a valid acl object
 *   T session access topic now    an ACL check of a kept session (access as for S), the files re-read
 *                                 first if they changed (as the tick does, judging every session's
 *                                 credential again): 'Y' or 'N', field: its denied_until; '!' if no such session
 *   D session                     the session ended, as on DISCONNECT: '+' ('!' if no such session)
 *   M filter topic                topic_matches: 'Y' or 'N'
 *   V allowed requested           filter_covers: 'Y' or 'N'
 *   F filter                      is_valid_filter: 'Y' or 'N'
 *   X value_hex                   scope_of_value on a certificate scope extension's value (hex, so it may
 *                                 hold NULs): answer 'A' (field: the scope as JSON) or 'R' (field: reason)
 *   K cert_hex username client_id now   a CONNECT over a DER certificate (hex) at `now`, the files re-read
 *                                 first: 'A' (fields device id, notAfter, scope as JSON, serial number,
 *                                 the denylist's until for it, the session's number: kept as for C) or
 *                                 'R' (field: reason); '!' when cert_hex is not a certificate
 */

#include <stdarg.h>

#include "provbridge_jwt.c"

/* --- stand-ins for what the broker exports to plugins ------------------------------------- */

void mosquitto_log_printf(int level, const char *fmt, ...)
{
	/* Formatted all the same, so a bad argument (a NULL %s, a wrong type) shows under the sanitizers. */
	char line[1024];
	va_list args;
	(void)level;
	va_start(args, fmt);
	vsnprintf(line, sizeof(line), fmt, args);
	va_end(args);
	if(getenv("PBJ_HARNESS_LOG") != NULL) fprintf(stderr, "%s\n", line);
}

const char *mosquitto_client_id(const struct mosquitto *client)
{
	(void)client;
	return NULL;
}

const char *mosquitto_client_username(const struct mosquitto *client)
{
	(void)client;
	return NULL;
}

void *mosquitto_client_certificate(const struct mosquitto *client)
{
	(void)client;
	return NULL;
}

int mosquitto_kick_client_by_username(const char *username, bool with_will)
{
	(void)username;
	(void)with_will;
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_broker_publish_copy(const char *clientid, const char *topic, int payloadlen, const void *payload,
		int qos, bool retain, mosquitto_property *properties)
{
	/* The broker's own argument checks (src/plugin_public.c); presence is off here (no topic_prefix option). */
	(void)clientid;
	(void)retain;
	(void)properties;
	if(topic == NULL || payloadlen < 0 || (payloadlen > 0 && payload == NULL) || qos < 0 || qos > 2){
		return MOSQ_ERR_INVAL;
	}
	if(getenv("PBJ_HARNESS_LOG") != NULL) fprintf(stderr, "publish %s %.*s\n", topic, payloadlen, (const char *)payload);
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_callback_register(mosquitto_plugin_id_t *identifier, int event, MOSQ_FUNC_generic_callback cb_func,
		const void *event_data, void *userdata)
{
	(void)identifier;
	(void)event;
	(void)cb_func;
	(void)event_data;
	(void)userdata;
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_callback_unregister(mosquitto_plugin_id_t *identifier, int event, MOSQ_FUNC_generic_callback cb_func,
		const void *event_data)
{
	(void)identifier;
	(void)event;
	(void)cb_func;
	(void)event_data;
	return MOSQ_ERR_SUCCESS;
}

/* --- the protocol -------------------------------------------------------------------------- */

#define MAX_FIELDS 6
#define MAX_FIELD_BYTES (16u * 1024 * 1024)

struct request {
	char command;
	char *field[MAX_FIELDS];
};

static bool read_exact(void *buf, size_t n)
{
	return n == 0 || fread(buf, 1, n, stdin) == n;
}

/* One field, NUL-terminated after its bytes (so cut at its first NUL when read as a C string). */
static char *read_field(void)
{
	unsigned char len_bytes[4];
	if(!read_exact(len_bytes, 4)) return NULL;
	uint32_t len = (uint32_t)len_bytes[0] | (uint32_t)len_bytes[1] << 8 | (uint32_t)len_bytes[2] << 16
		| (uint32_t)len_bytes[3] << 24;
	if(len > MAX_FIELD_BYTES) return NULL;
	char *field = malloc((size_t)len + 1);
	if(field == NULL || !read_exact(field, len)){
		free(field);
		return NULL;
	}
	field[len] = '\0';
	return field;
}

static void write_u32(size_t n)
{
	unsigned char bytes[4] = {
		(unsigned char)(n & 0xFF), (unsigned char)(n >> 8 & 0xFF), (unsigned char)(n >> 16 & 0xFF),
		(unsigned char)(n >> 24 & 0xFF)};
	fwrite(bytes, 1, 4, stdout);
}

static void write_field(const char *bytes, size_t len)
{
	write_u32(len);
	fwrite(bytes, 1, len, stdout);
}

/* An answer's code and how many fields follow. */
static void answer(char code, size_t fields)
{
	fputc(code, stdout);
	write_u32(fields);
}

static void write_string(const char *s)
{
	write_field(s, strlen(s));
}

static int fields_of(char command)
{
	switch(command){
		case 'P': return 4;
		case 'R': return 1;
		case 'C': return 4;
		case 'S': return 6;
		case 'M': return 2;
		case 'V': return 2;
		case 'F': return 1;
		case 'X': return 1;
		case 'K': return 4;
		case 'T': return 4;
		case 'D': return 1;
		default: return -1;
	}
}

static struct plugin *configure(struct plugin *old, char **f)
{
	struct mosquitto_opt options[] = {
		{.key = "jwks_file", .value = f[0]},
		{.key = "denylist_file", .value = f[1]},
		{.key = "audience", .value = f[2]},
		{.key = "issuer", .value = f[3]},
	};
	int rc;
	if(old != NULL) free_plugin(old);
	return plugin_new(options, (int)(sizeof(options) / sizeof(options[0])), &rc);
}

static void refresh(struct plugin *p, const char *force)
{
	if(strcmp(force, "1") == 0){
		/* As if both files had changed: the next stat sees them anew (or missing, as before). */
		p->jwks_file.ino = 0;
		p->jwks_file.size = -1;
		p->denylist_file.ino = 0;
		p->denylist_file.size = -1;
	}
	refresh_files(p);
	size_t usable = p->jwks_file.present ? p->key_count : 0;
	answer('+', usable);
	for(size_t i = 0; i < usable; i++) write_string(p->keys[i].kid);
}

/* Sessions are kept under stand-in contexts, numbered from 1: addresses never dereferenced, as distinct
 * as Mosquitto's (bucket_of drops the low 4 bits). */
static unsigned long sessions_made;

static const struct mosquitto *client_of(unsigned long number)
{
	return (const struct mosquitto *)(uintptr_t)(number << 4);
}

/* A new stand-in context and its number (as text, for the answer). */
static const struct mosquitto *new_client(char number_text[32])
{
	snprintf(number_text, 32, "%lu", ++sessions_made);
	return client_of(sessions_made);
}

/* The session numbered `text`, NULL when there is none. */
static struct session *session_numbered(struct plugin *p, const char *text)
{
	char *end = NULL;
	unsigned long number = strtoul(text, &end, 10);
	if(end == text || *end != '\0' || number == 0 || number > sessions_made) return NULL;
	return session_find(p, client_of(number));
}

static void write_long(long long value)
{
	char text[32];
	snprintf(text, sizeof(text), "%lld", value);
	write_string(text);
}

static void connect_device(struct plugin *p, char **f)
{
	const char *username = f[0], *client_id = f[1], *password = f[2];
	double now = strtod(f[3], NULL);
	/* As on_basic_auth: a non-device is deferred; a device's CONNECT first re-reads changed files. */
	if(!is_device_id(username)){
		answer('D', 0);
		return;
	}
	refresh_files(p);
	char number[32];
	struct session *s = NULL;
	const char *reason = token_session(p, new_client(number), username, client_id, password, now, &s);
	if(reason != NULL){
		answer('R', 1);
		write_string(reason);
		return;
	}
	/* What on_basic_auth keeps for the session: exp, the acl object, the token's gen, the denylist's until. */
	char generation[40];
	snprintf(generation, sizeof(generation), "%.17g", s->generation);
	char *acl = cJSON_PrintUnformatted(s->acl);
	answer('A', 5);
	write_long(s->exp);
	write_string(acl != NULL ? acl : "");
	write_string(generation);
	write_long(s->denied_until);
	write_string(number);
	cJSON_free(acl);
}

/* An ACL check of a kept session, after the files are re-read if they changed (as the tick does). */
static void session_check(struct plugin *p, char **f)
{
	refresh_files(p);
	struct session *s = session_numbered(p, f[0]);
	if(s == NULL){
		answer('!', 0);
		return;
	}
	const char *access = f[1];
	int kind = !strcmp(access, "write") ? MOSQ_ACL_WRITE
		: !strcmp(access, "read") ? MOSQ_ACL_READ
		: !strcmp(access, "subscribe") ? MOSQ_ACL_SUBSCRIBE : -1;
	bool allowed = kind >= 0 && acl_allows(s, kind, f[2], strtoll(f[3], NULL, 10));
	answer(allowed ? 'Y' : 'N', 1);
	write_long(s->denied_until);
}

static void disconnect(struct plugin *p, char **f)
{
	struct session *s = session_numbered(p, f[0]);
	if(s != NULL) session_remove(p, s->client);
	answer(s != NULL ? '+' : '!', 0);
}

static void acl_check(char **f)
{
	struct session s = {0};
	const char *access = f[3];
	s.exp = strtoll(f[1], NULL, 10);
	s.denied_until = strtoll(f[2], NULL, 10);
	s.acl = parse_json(f[0], strlen(f[0]));
	if(!cJSON_IsObject(s.acl) || !filters_ok(s.acl, "pub") || !filters_ok(s.acl, "sub")){
		cJSON_Delete(s.acl);
		answer('E', 0);
		return;
	}
	int kind = !strcmp(access, "write") ? MOSQ_ACL_WRITE
		: !strcmp(access, "read") ? MOSQ_ACL_READ
		: !strcmp(access, "subscribe") ? MOSQ_ACL_SUBSCRIBE : -1;
	bool allowed = kind >= 0 && acl_allows(&s, kind, f[4], strtoll(f[5], NULL, 10));
	cJSON_Delete(s.acl);
	answer(allowed ? 'Y' : 'N', 0);
}

/* Hex to bytes (malloc'd, *len set); NULL when `hex` is not hex. */
static unsigned char *unhex(const char *hex, size_t *len)
{
	size_t n = strlen(hex);
	if(n % 2 != 0) return NULL;
	unsigned char *out = malloc(n / 2 + 1);
	if(out == NULL) return NULL;
	for(size_t i = 0; i < n / 2; i++){
		unsigned int byte;
		if(sscanf(hex + 2 * i, "%2x", &byte) != 1){
			free(out);
			return NULL;
		}
		out[i] = (unsigned char)byte;
	}
	*len = n / 2;
	return out;
}

static void answer_scope(const char *reason, cJSON *scope, size_t extra_fields)
{
	if(reason != NULL){
		answer('R', 1);
		write_string(reason);
		return;
	}
	char *text = cJSON_PrintUnformatted(scope);
	answer('A', 1 + extra_fields);
	write_string(text != NULL ? text : "");
	cJSON_free(text);
}

static void scope_value(char **f)
{
	size_t len = 0;
	cJSON *scope = NULL;
	unsigned char *der = unhex(f[0], &len);
	if(der == NULL){
		answer('!', 0);
		return;
	}
	const char *reason = scope_of_value(der, len, &scope); /* before `scope` is read: argument order is unspecified */
	answer_scope(reason, scope, 0);
	cJSON_Delete(scope);
	free(der);
}

static void connect_certificate(struct plugin *p, char **f)
{
	size_t len = 0;
	unsigned char *der = unhex(f[0], &len);
	const unsigned char *cursor = der;
	X509 *cert = der != NULL ? d2i_X509(NULL, &cursor, (long)len) : NULL;
	free(der);
	if(cert == NULL){
		answer('!', 0);
		return;
	}
	refresh_files(p);
	char device_id[DEVICE_ID_LEN + 1] = "";
	char number[32];
	struct session *s = NULL;
	const char *reason = certificate_session(p, new_client(number), cert, f[1], f[2], strtod(f[3], NULL), device_id,
			&s);
	X509_free(cert);
	if(reason != NULL){
		answer_scope(reason, NULL, 0);
		return;
	}
	/* device id and notAfter first, then the scope, then what the denylist judges: serial and until */
	char *text = cJSON_PrintUnformatted(s->acl);
	answer('A', 6);
	write_string(s->device_id);
	write_long(s->exp);
	write_string(text != NULL ? text : "");
	write_string(s->serial);
	write_long(s->denied_until);
	write_string(number);
	cJSON_free(text);
}

int main(void)
{
	struct plugin *p = NULL;
	int command;
	while((command = getchar()) != EOF){
		struct request r = {.command = (char)command};
		int count = fields_of(r.command);
		bool ok = count >= 0;
		for(int i = 0; ok && i < count; i++){
			r.field[i] = read_field();
			ok = r.field[i] != NULL;
		}
		if(!ok){
			for(int i = 0; i < MAX_FIELDS; i++) free(r.field[i]);
			fprintf(stderr, "harness: bad request (command %d)\n", command);
			if(p != NULL) free_plugin(p);
			return 2;
		}
		if(strchr("RCKTD", r.command) != NULL && p == NULL){
			answer('!', 0); /* no plugin configured yet */
		}else{
			switch(r.command){
				case 'P':
					p = configure(p, r.field);
					answer(p != NULL ? '+' : '!', 0);
					break;
				case 'R': refresh(p, r.field[0]); break;
				case 'C': connect_device(p, r.field); break;
				case 'S': acl_check(r.field); break;
				case 'M': answer(topic_matches(r.field[0], r.field[1]) ? 'Y' : 'N', 0); break;
				case 'V': answer(filter_covers(r.field[0], r.field[1]) ? 'Y' : 'N', 0); break;
				case 'F': answer(is_valid_filter(r.field[0]) ? 'Y' : 'N', 0); break;
				case 'X': scope_value(r.field); break;
				case 'K': connect_certificate(p, r.field); break;
				case 'T': session_check(p, r.field); break;
				case 'D': disconnect(p, r.field); break;
				default: break;
			}
		}
		fflush(stdout);
		for(int i = 0; i < MAX_FIELDS; i++) free(r.field[i]);
	}
	if(p != NULL) free_plugin(p);
	return 0;
}
