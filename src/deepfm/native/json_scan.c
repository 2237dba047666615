/* Two facts of a JSON text that the server needs before it parses a request body, in one pass over the bytes
 * (deepfm.serve.limits.scan_body; its numpy path follows the same rule and a test compares the two):
 *
 *   out[0]: the deepest nesting of arrays and objects. Brackets inside strings do not count; a quote opens or
 *           closes a string unless an odd run of backslashes precedes it.
 *   out[1]: the longest run of ASCII digits anywhere (strings included): orjson reads an integer of 19 digits
 *           or more differently from Python's reader, which then reads the body.
 */
#include <stdint.h>

/* Branch-free: a request body alternates between digits, letters, quotes and brackets every few bytes, and a
 * branch per byte class is mispredicted about as often as not. */
void deepfm_json_scan(const uint8_t *s, int64_t n, int64_t *out)
{
    int64_t depth = 0, deepest = 0, run = 0, longest = 0;
    int64_t inside = 0, escaped = 0;
    for (int64_t i = 0; i < n; ++i) {
        const uint8_t c = s[i];
        const int64_t digit = (uint8_t)(c - '0') < 10;
        run = (run + 1) * digit;
        longest = run > longest ? run : longest;
        const int64_t backslash = c == '\\';
        const int64_t quote = (c == '"') & !escaped;
        escaped = backslash & !escaped; /* a backslash escapes the next byte unless it is itself escaped */
        inside ^= quote;
        const int64_t step = (int64_t)((c == '[') | (c == '{')) - (int64_t)((c == ']') | (c == '}'));
        depth += step & -(int64_t)!inside;
        deepest = depth > deepest ? depth : deepest;
    }
    out[0] = deepest;
    out[1] = longest;
}
