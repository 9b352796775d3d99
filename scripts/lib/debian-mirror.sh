# Sourced by scripts that add Debian suites: prints the Debian mirror this machine's apt
# sources already use (deb822 `.sources` files first, then one-line `.list` files), without a
# trailing slash, or nothing when none is configured. No host name is baked into the project.
debian_mirror() {
    local uri
    uri=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\/debian\/*\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
    [ -n "$uri" ] || uri=$(sed -n 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]*\/debian\/*\)[[:space:]].*/\2/p' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | head -n 1)
    printf '%s\n' "${uri%/}"
}
